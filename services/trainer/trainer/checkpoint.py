"""
Checkpoints: runs/<run>/<phase>/step_XXXXXX/ with

    model.safetensors   the weights (no pickle)
    meta.json           step, model config, the program's flags, metrics, code version
    rank00.pt …         per process: optimizer state (sharded Muon state differs per rank),
                        dataloader state, RNG states and the fp16 grad scaler's state
                        (loaded with weights_only=True: data, no code)

Everything is written into a hidden temp folder that is renamed into place at the end, so a step
folder exists only complete: a crash while saving leaves the previous checkpoint as the latest.
Keep-last-K deletes older steps only after the new one is in place.
"""

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from trainer.common import git_commit, make_temp_dir, replace_dir
from trainer.gpt import GPT, GPTConfig
from trainer.runtime import Runtime
from trainer.tokenizer import Tokenizer

STEP_DIR = re.compile(r"^step_([0-9]{6})$")


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"step_{step:06d}"


def list_steps(folder: Path) -> list[int]:
    """Steps with a complete checkpoint, oldest first (temp folders of interrupted saves are ignored)."""
    if not folder.is_dir():
        return []
    steps = [int(m.group(1)) for p in folder.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(s for s in steps if (step_dir(folder, s) / "meta.json").exists())


def rng_state(runtime: Runtime) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def save(
    folder: Path,
    step: int,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    loader_state: dict,
    meta: dict[str, Any],
    runtime: Runtime,
    keep: int,
    scaler: torch.amp.GradScaler | None = None,
) -> Path:
    """Every process calls this; rank 0 writes the shared files and publishes the folder."""
    final = step_dir(folder, step)
    tmp = folder / f".{final.name}.tmp"
    if runtime.is_master:
        shutil.rmtree(tmp, ignore_errors=True)  # left over by a save that crashed
        tmp.mkdir(parents=True)
    runtime.barrier()
    rank_state = {"optimizer": optimizer.state_dict(), "dataloader": loader_state, "rng": rng_state(runtime)}
    if scaler is not None:
        rank_state["grad_scaler"] = scaler.state_dict()
    torch.save(rank_state, tmp / f"rank{runtime.rank:02d}.pt")
    if runtime.is_master:
        weights = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors")
        meta = {
            "step": step,
            "model_config": model.config.to_dict(),
            "compute_dtype": str(runtime.dtype).removeprefix("torch."),
            "world_size": runtime.world_size,
            "code": git_commit(),
            **meta,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    runtime.barrier()
    if runtime.is_master:
        replace_dir(tmp, final)
        for old in list_steps(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(step_dir(folder, old))
    runtime.barrier()
    return final


def resolve_step(folder: Path, step: int | None) -> int:
    """`step` if it has a complete checkpoint, the latest one when None; a clear exit otherwise."""
    steps = list_steps(folder)
    if not steps:
        raise SystemExit(f"no checkpoint in {folder}: train this stage first")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise SystemExit(f"no complete checkpoint for step {step} in {folder} (have: {steps})")
    return step


def read_meta(folder: Path, step: int) -> dict[str, Any]:
    return json.loads((step_dir(folder, step) / "meta.json").read_text())


def load_weights(folder: Path, step: int, model: GPT) -> None:
    """Copy a checkpoint's weights into a model of the same config (its compute dtype already set)."""
    model.load_state_dict(
        load_file(step_dir(folder, step) / "model.safetensors", device=str(model.wte.weight.device))
    )


def load_model(folder: Path, step: int, device: torch.device, dtype: torch.dtype) -> tuple[GPT, dict]:
    """The model of a checkpoint, ready for training or sampling in `dtype`."""
    meta = read_meta(folder, step)
    model = GPT(GPTConfig(**meta["model_config"]))
    model.set_compute_dtype(dtype)
    load_weights(folder, step, model)
    return model.to(device), meta


def load_training_state(
    folder: Path,
    step: int,
    optimizer: torch.optim.Optimizer,
    runtime: Runtime,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, Any]:
    """Restore this process's optimizer, RNG and grad scaler states; returns its dataloader state."""
    meta = read_meta(folder, step)
    if meta["world_size"] != runtime.world_size:
        raise SystemExit(
            f"checkpoint step {step} was written by {meta['world_size']} processes; resume it with as many "
            f"(this run has {runtime.world_size})"
        )
    dtype = str(runtime.dtype).removeprefix("torch.")
    if meta["compute_dtype"] != dtype:
        raise SystemExit(
            f"checkpoint step {step} was trained in {meta['compute_dtype']}; resume it with "
            f"--dtype {meta['compute_dtype']} (this run computes in {dtype})"
        )
    state = torch.load(
        step_dir(folder, step) / f"rank{runtime.rank:02d}.pt", map_location="cpu", weights_only=True
    )
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None:
        scaler.load_state_dict(state["grad_scaler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"] and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"]["cuda"], runtime.device)
    return state["dataloader"]


class ImportRefused(SystemExit):
    """A model this code cannot import (or not where it was asked to go), with the reason."""


def check_shapes(weights: dict[str, torch.Tensor], config: GPTConfig, refusal: str) -> None:
    """Refused (`refusal`: the first differences) unless every tensor has its place and shape in our model."""
    expected = {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    if found != expected:
        differences = sorted(
            f"{name}: {found.get(name, 'missing')} (ours: {expected.get(name, 'none')})"
            for name in set(found) | set(expected)
            if found.get(name) != expected.get(name)
        )
        raise ImportRefused(f"{refusal}: " + "; ".join(differences[:6]))


def save_imported(
    run_dir: Path, stage: str, step: int, weights: dict[str, torch.Tensor], config: GPTConfig,
    tokenizer: Tokenizer, meta: dict[str, Any],
) -> Path:  # fmt: skip
    """A model trained elsewhere as runs/<run>/<stage>/step_<step>/ (fp32 weights, no optimizer state) with
    its tokenizer as the run's. Refused where the step exists or the run has another tokenizer."""
    check_shapes(weights, config, "its weights do not fit the model they describe")
    if tokenizer.vocab_size != config.vocab_size:
        raise ImportRefused(
            f"the tokenizer has {tokenizer.vocab_size:,} tokens, the model {config.vocab_size:,}"
        )
    if (run_dir / "tokenizer").exists() and Tokenizer.load(run_dir / "tokenizer").ranks != tokenizer.ranks:
        raise ImportRefused(f"run {run_dir.name!r} already has another tokenizer: import into a new run")
    destination = step_dir(run_dir / stage, step)
    if destination.exists():
        raise ImportRefused(f"{destination} exists already")
    tokenizer.save(run_dir / "tokenizer")
    tmp = make_temp_dir(destination)
    save_file({name: t.float().contiguous() for name, t in weights.items()}, tmp / "model.safetensors")
    meta = {
        "step": step,
        "model_config": config.to_dict(),
        "compute_dtype": "float32",
        "world_size": 1,
        **meta,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    replace_dir(tmp, destination)
    return destination
