"""
What every training stage shares (base, mid, sft, rl): the recipe's optimizer groups, one optimizer step
with gradient accumulation (and fp16 loss scaling), the loop state saved with checkpoints, the metrics
log, where a stage resumes from, and the "recipe" a stage hands to the next one.
"""

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from trainer import attention, checkpoint
from trainer.common import CHECKPOINT_STEP, LEARNING_RATE, Bounded, print0, print_banner, run_name
from trainer.gpt import GPT
from trainer.optim import MuonAdamW
from trainer.runtime import Runtime, StopRequest, setup_runtime, shutdown
from trainer.settings import TrainerSettings

# The reference's "total training time" leaves out steps 0-10 (its `step > 10`): compilation, warm-up.
UNTIMED_STEPS = 11


@dataclass
class Recipe:
    """The batch and learning rates a run trained with; the next stage inherits them (RECIPE.md: SFT
    inherits batch and LR from the base run), flags override them."""

    max_seq_len: int
    device_batch_size: int
    total_batch_size: int
    lr_scale: float  # √(B/B_ref), applied to every LR but smear/backout's
    matrix_lr: float
    embedding_lr: float
    unembedding_lr: float
    scalar_lr: float

    def override(self, args: argparse.Namespace) -> "Recipe":
        """This recipe with every flag of the same name that was given (not None) in its place."""
        given = {name: getattr(args, name) for name in asdict(self) if getattr(args, name, None) is not None}
        return Recipe(**{**asdict(self), **given})


def build_optimizer(model: GPT, recipe: Recipe, weight_decay: float, lr_frac: float = 1.0) -> MuonAdamW:
    """The recipe's parameter groups: LRs × lr_frac × √(B/B_ref) (smear/backout excepted), the
    embeddings' and lm_head's also × (width/768)^−½. `base_lr` is what the schedules multiply."""
    s = recipe.lr_scale * lr_frac
    width_scale = (model.config.n_embd / 768) ** -0.5
    embedding_lr = recipe.embedding_lr * width_scale * s

    def adamw(params, lr, betas, decay):
        return {
            "kind": "adamw",
            "params": params,
            "lr": lr,
            "betas": betas,
            "eps": 1e-10,
            "weight_decay": decay,
        }

    groups = [
        adamw([model.lm_head.weight], recipe.unembedding_lr * width_scale * s, (0.8, 0.96), 0.01),
        adamw([model.wte.weight], embedding_lr, (0.8, 0.995), 0.001),
        adamw([model.resid_lambdas], recipe.scalar_lr * 0.01 * s, (0.8, 0.95), 0.05),
        adamw([model.x0_lambdas], recipe.scalar_lr * s, (0.96, 0.95), 0.0),
    ]
    if model.value_embeds:
        groups.append(adamw(list(model.value_embeds.parameters()), embedding_lr / 2, (0.8, 0.995), 0.01))
    small = [p for p in (model.smear_lambda, model.backout_lambda) if p is not None]
    if model.smear_gate is not None:
        small.append(model.smear_gate.weight)
    if small:  # the recipe's one LR not scaled by the batch factor
        groups.append(adamw(small, 0.2 * lr_frac, (0.8, 0.95), 0.0))
    matrices = model.matrix_params()
    for shape in sorted({tuple(p.shape) for p in matrices}):
        params = [p for p in matrices if tuple(p.shape) == shape]
        muon = {"kind": "muon", "params": params, "lr": recipe.matrix_lr * s, "momentum": 0.95, "beta2": 0.9}
        groups.append({**muon, "weight_decay": weight_decay, "ns_steps": 5})
    for group in groups:
        group["base_lr"], group["base_weight_decay"] = group["lr"], group["weight_decay"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())), "a parameter has no group"
    return MuonAdamW(groups, compute_dtype=model.compute_dtype)


def warm_start_optimizer(
    optimizer: MuonAdamW, folder: Path, step: int, runtime: Runtime, weight_decay: float
) -> bool:
    """Load a finished stage's momentum buffers into a fresh optimizer (as the reference's SFT does), keeping
    this stage's LRs and weight decay. False when the checkpoint holds no optimizer state for this number
    of processes: written by another number (each holds its own shard), or imported (nanochat_import)."""
    shard = checkpoint.step_dir(folder, step) / f"rank{runtime.rank:02d}.pt"
    if checkpoint.read_meta(folder, step)["world_size"] != runtime.world_size or not shard.exists():
        return False
    fresh = [(g["lr"], g["base_lr"]) for g in optimizer.param_groups]
    state = torch.load(shard, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])  # also brings back the old stage's group settings
    for group, (lr, base_lr) in zip(optimizer.param_groups, fresh, strict=True):
        group["lr"], group["base_lr"] = lr, base_lr
        if group["kind"] == "muon":
            group["weight_decay"] = group["base_weight_decay"] = weight_decay
    return True


def train_step(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: MuonAdamW,
    accumulation: int,
    scaler: torch.amp.GradScaler | None,
    runtime: Runtime,
) -> float:
    """One optimizer step over `accumulation` micro-batches; returns this process's mean loss."""
    total_loss = torch.zeros((), device=runtime.device)
    for _ in range(accumulation):
        inputs, targets = next(batches)
        loss = model(inputs, targets) / accumulation
        (scaler.scale(loss) if scaler else loss).backward()
        total_loss += loss.detach()
    optimizer_step(optimizer, scaler, runtime)
    return total_loss.item()  # one device sync per step, not one per micro-batch


def optimizer_step(optimizer: MuonAdamW, scaler: torch.amp.GradScaler | None, runtime: Runtime) -> None:
    if scaler:
        scaler.unscale_(optimizer)
        if runtime.distributed:  # skip on every rank or on none: the optimizer's collectives must pair up
            for found_inf in scaler._found_inf_per_device(optimizer).values():
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        scaler.step(optimizer)  # skipped when a gradient is inf/nan; the scale then halves
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def grad_scaler(runtime: Runtime) -> torch.amp.GradScaler | None:
    """fp16's narrow range needs loss scaling; bf16 has fp32's exponent range and needs none."""
    return torch.amp.GradScaler(runtime.device.type) if runtime.dtype == torch.float16 else None


@dataclass
class LoopState:
    """What a loop carries across steps besides model, optimizer and data; saved with checkpoints, so a
    resumed run reports what an uninterrupted one would."""

    val_bpb: float | None = None
    min_val_bpb: float | None = None
    training_time: float = 0.0  # seconds of steps ≥ UNTIMED_STEPS: the reference's "total training time"
    startup_time: float = 0.0  # seconds of the first UNTIMED_STEPS steps
    wall_time: float = 0.0  # seconds of the loop, evaluations and checkpoints included, up to the last save

    def record_eval(self, val_bpb: float) -> None:
        self.val_bpb = val_bpb
        self.min_val_bpb = val_bpb if self.min_val_bpb is None else min(self.min_val_bpb, val_bpb)

    def record_step(self, step: int, seconds: float) -> None:
        if step >= UNTIMED_STEPS:
            self.training_time += seconds
        else:
            self.startup_time += seconds


class MetricsLog:
    """runs/<run>/<stage>/metrics.jsonl, one JSON object per line; rank 0 writes. When the worker
    runs the program it sets NANOCHAT_METRICS_PREFIX, and each record is also printed after that
    prefix, so the worker can stream it live without reading the file."""

    def __init__(self, path: Path, runtime: Runtime, resume_step: int | None) -> None:
        self.path, self.enabled = path, runtime.is_master
        if not self.enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():  # drop what a crashed run logged past the checkpoint we resume from
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if prefix := os.environ.get("NANOCHAT_METRICS_PREFIX"):
                print(prefix + json.dumps(record), flush=True)


def resume_step(args: argparse.Namespace, out_dir: Path) -> int | None:
    """The checkpoint to continue from: --resume-from-step, or the latest with --resume, or None."""
    if args.resume_from_step is not None:
        return checkpoint.resolve_step(out_dir, args.resume_from_step)
    steps = checkpoint.list_steps(out_dir)
    if args.resume and not steps:
        print0(f"--resume: no checkpoint in {out_dir} yet, starting from step 0")
    return steps[-1] if args.resume and steps else None


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def rounded(value: float | None, digits: int = 4) -> float | None:
    return round(value, digits) if value is not None else None


def summary_times(loop: LoopState, wall_seconds: float) -> dict[str, Any]:
    return {
        "training_minutes": round(loop.training_time / 60, 2),
        "startup_seconds": round(loop.startup_time, 1),
        "wall_seconds": round(wall_seconds, 1),
    }


def add_source_flags(parser: argparse.ArgumentParser, default: str, choices: tuple[str, ...]) -> None:
    group = parser.add_argument_group("Source model")
    group.add_argument(
        "--source", choices=choices, default=default, help=f"the stage to start from (default: {default})"
    )
    group.add_argument(
        "--source-run", type=run_name, default=None, help="the run to start from (default: --run)"
    )
    group.add_argument(
        "--source-step", type=CHECKPOINT_STEP, default=None, help="its checkpoint step (default: latest)"
    )


def add_lr_flags(parser: argparse.ArgumentParser, init_lr_frac: float) -> argparse._ArgumentGroup:
    """A chat stage's LR flags: the recipe's LRs (default: the source run's) and the stage's fraction."""
    group = parser.add_argument_group("Optimization (LRs default to the source run's)")
    for flag in ("--matrix-lr", "--embedding-lr", "--unembedding-lr", "--scalar-lr"):
        group.add_argument(flag, type=LEARNING_RATE, default=None)
    group.add_argument(
        "--init-lr-frac",
        type=Bounded(float, maximum=10, exclusive_minimum=0),
        default=init_lr_frac,
        help=f"LR as a fraction of the source's (default: {init_lr_frac})",
    )
    return group


@dataclass
class Source:
    """The checkpoint a chat stage starts from."""

    folder: Path
    step: int
    meta: dict[str, Any]

    @property
    def recipe(self) -> Recipe:
        return Recipe(**self.meta["recipe"])


def open_source(settings: TrainerSettings, args: argparse.Namespace) -> Source:
    """The source checkpoint; the run's tokenizer is copied over when it trains into another run."""
    source_run = args.source_run or args.run
    folder = settings.run_dir(source_run) / args.source
    step = checkpoint.resolve_step(folder, args.source_step)
    tokenizer_dir = settings.run_dir(args.run) / "tokenizer"
    if source_run != args.run and not tokenizer_dir.exists():
        shutil.copytree(settings.run_dir(source_run) / "tokenizer", tokenizer_dir)
    return Source(folder, step, checkpoint.read_meta(folder, step))


def run_training(
    program: str,
    args: argparse.Namespace,
    train: Callable[[argparse.Namespace, TrainerSettings, Runtime, StopRequest], dict],
) -> dict:
    """What every training program's main does around its loop: runtime, settings, banner, SIGTERM."""
    runtime = setup_runtime(args.device, args.dtype)
    settings = TrainerSettings()
    print_banner(program, args, settings)
    print0(f"attention: {attention.describe(runtime.device, runtime.dtype)}")
    stop = StopRequest()
    try:
        return train(args, settings, runtime, stop)
    finally:
        shutdown(runtime)


def exit_stopped(runtime: Runtime, step: int) -> NoReturn:
    """After the checkpoint of a SIGTERM: exit 143, as a process killed by SIGTERM does."""
    print0(f"stopped at step {step}; resume with --resume")
    shutdown(runtime)
    sys.exit(143)


def runtime_summary(runtime: Runtime) -> dict[str, Any]:
    summary = {
        "device": f"{runtime.device} × {runtime.world_size}",
        "gpus": runtime.gpus,
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "attention": attention.describe(runtime.device, runtime.dtype),
    }
    if runtime.device.type == "cuda":  # what a smaller GPU would need to hold (this process's share)
        summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(runtime.device) / 2**30, 2)
    return summary
