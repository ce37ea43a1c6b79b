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
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from trainer import attention, checkpoint
from trainer.common import CHECKPOINT_STEP, LEARNING_RATE, Bounded, print0, print_banner, run_name
from trainer.gpt import GPT
from trainer.optim import MuonAdamW
from trainer.runtime import EvalStopped, Runtime, StopRequest, setup_runtime, shutdown
from trainer.settings import TrainerSettings

# The reference's "total training time" leaves out steps 0-10 (its `step > 10`): compilation, warm-up.
UNTIMED_STEPS = 11


@dataclass
class LearningRates:
    """The optimizer's LRs before × lr_frac, and the batch factor on every one but smear/backout's
    (base pretraining: √(B/B_ref); the chat stages: 1, as the reference's)."""

    matrix_lr: float
    embedding_lr: float
    unembedding_lr: float
    scalar_lr: float
    lr_scale: float = 1.0


# The LRs the reference's chat stages set for themselves: mid_train's, the classic chat_sft's and chat_rl's
# flags, and setup_optimizer's scalar LR, which no chat stage inherits from the base run.
CHAT_LRS = LearningRates(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004, scalar_lr=0.5)
LR_NAMES = ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr")
# The current SFT inherits these from the base run's flags (raw, without the base run's batch factor).
INHERITED_LRS = ("matrix_lr", "embedding_lr", "unembedding_lr")


@dataclass
class Recipe:
    """The batch and learning rates a run trained with, saved with its checkpoints: the next stage
    inherits the batch (and the current SFT the raw LRs of INHERITED_LRS); flags override them."""

    max_seq_len: int
    device_batch_size: int
    total_batch_size: int
    lr_scale: float  # the batch factor of LearningRates
    matrix_lr: float
    embedding_lr: float
    unembedding_lr: float
    scalar_lr: float

    def override(self, args: argparse.Namespace) -> "Recipe":
        """This recipe with every flag of the same name that was given (not None) in its place."""
        given = {name: getattr(args, name) for name in asdict(self) if getattr(args, name, None) is not None}
        return Recipe(**{**asdict(self), **given})

    def learning_rates(self) -> LearningRates:
        return LearningRates(
            self.matrix_lr, self.embedding_lr, self.unembedding_lr, self.scalar_lr, self.lr_scale
        )


@dataclass(frozen=True)
class GroupSettings:
    """What a reference version's setup_optimizer sets besides the LRs: each AdamW group's (betas, weight
    decay), the value embeddings' share of the embedding LR and NorMuon's β2. Base pretraining and the
    current recipe's stages use 92d63d4's, the classic recipe's chat stages 348fbb3's."""

    lm_head: tuple[tuple[float, float], float]
    embedding: tuple[tuple[float, float], float]
    value_embeds: tuple[tuple[float, float], float]
    resid: tuple[tuple[float, float], float]
    x0: tuple[tuple[float, float], float]
    value_embeds_lr_share: float
    muon_beta2: float


GROUP_SETTINGS = {
    "current": GroupSettings(
        lm_head=((0.8, 0.96), 0.01),
        embedding=((0.8, 0.995), 0.001),
        value_embeds=((0.8, 0.995), 0.01),
        resid=((0.8, 0.95), 0.05),
        x0=((0.96, 0.95), 0.0),
        value_embeds_lr_share=0.5,
        muon_beta2=0.9,
    ),
    "classic": GroupSettings(
        lm_head=((0.8, 0.95), 0.0),
        embedding=((0.8, 0.95), 0.0),
        value_embeds=((0.8, 0.95), 0.0),
        resid=((0.8, 0.95), 0.0),
        x0=((0.96, 0.95), 0.0),
        value_embeds_lr_share=1.0,
        muon_beta2=0.95,
    ),
}


def build_optimizer(
    model: GPT, lrs: LearningRates, weight_decay: float, lr_frac: float = 1.0, version: str = "current"
) -> MuonAdamW:
    """The parameter groups of a reference version (GROUP_SETTINGS), each named: LRs × lr_frac × the batch
    factor (smear/backout excepted), the embeddings' and lm_head's also × (width/768)^−½. `base_lr` is
    what the schedules multiply. Smear and backout (92d63d4's) keep its settings in either version."""
    settings = GROUP_SETTINGS[version]
    s = lrs.lr_scale * lr_frac
    width_scale = (model.config.n_embd / 768) ** -0.5
    embedding_lr = lrs.embedding_lr * width_scale * s

    def adamw(name, params, lr, betas_and_decay):
        betas, decay = betas_and_decay
        return {
            "name": name,
            "kind": "adamw",
            "params": params,
            "lr": lr,
            "betas": betas,
            "eps": 1e-10,
            "weight_decay": decay,
        }

    groups = [
        adamw("lm_head", [model.lm_head.weight], lrs.unembedding_lr * width_scale * s, settings.lm_head),
        adamw("embedding", [model.wte.weight], embedding_lr, settings.embedding),
    ]
    if model.config.layer_scalars:
        groups.append(adamw("resid", [model.resid_lambdas], lrs.scalar_lr * 0.01 * s, settings.resid))
        groups.append(adamw("x0", [model.x0_lambdas], lrs.scalar_lr * s, settings.x0))
    if model.value_embeds:
        value_embeds = list(model.value_embeds.parameters())
        lr = embedding_lr * settings.value_embeds_lr_share
        groups.append(adamw("value_embeds", value_embeds, lr, settings.value_embeds))
    small = [p for p in (model.smear_lambda, model.backout_lambda) if p is not None]
    if model.smear_gate is not None:
        small.append(model.smear_gate.weight)
    if small:  # the recipe's one LR not scaled by the batch factor
        groups.append(adamw("smear_backout", small, 0.2 * lr_frac, ((0.8, 0.95), 0.0)))
    matrices = model.matrix_params()
    for rows, cols in sorted({tuple(p.shape) for p in matrices}):
        params = [p for p in matrices if tuple(p.shape) == (rows, cols)]
        muon = {"name": f"matrices {rows}×{cols}", "kind": "muon", "params": params, "lr": lrs.matrix_lr * s}
        settings_of_muon = {"momentum": 0.95, "ns_steps": 5, "beta2": settings.muon_beta2}
        groups.append({**muon, **settings_of_muon, "weight_decay": weight_decay})
    for group in groups:
        group["base_lr"], group["base_weight_decay"] = group["lr"], group["weight_decay"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())), "a parameter has no group"
    return MuonAdamW(groups, compute_dtype=model.compute_dtype)


def warm_start_optimizer(optimizer: MuonAdamW, folder: Path, step: int, runtime: Runtime) -> bool:
    """Load a finished stage's momentum buffers into a fresh optimizer (as the reference's SFT does), keeping
    every setting of this stage's groups (LRs, betas, weight decay). False when the checkpoint holds no
    optimizer state for this number of processes: written by another number (each holds its own shard), or
    imported (nanochat_import)."""
    shard = checkpoint.step_dir(folder, step) / f"rank{runtime.rank:02d}.pt"
    if checkpoint.read_meta(folder, step)["world_size"] != runtime.world_size or not shard.exists():
        return False
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    state = torch.load(shard, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])  # also brings back the old stage's group settings
    for group, settings in zip(optimizer.param_groups, fresh, strict=True):
        group.update(settings)
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


def stop_if_diverged(loss: float, step: int) -> None:
    """A NaN or infinite loss (the same on every process: it is the all-reduced mean) means the run has
    diverged: stop with an error before a broken checkpoint is written, so a pipeline goes no further."""
    if not math.isfinite(loss):
        raise SystemExit(
            f"step {step}: the loss is {loss}, the run has diverged; nothing more is saved (the latest "
            "checkpoint is the last good one). Lower the learning rates, or train in float32"
        )


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
    evals_pending: bool = False  # a stop cut this step's evaluations short: a resume runs them first

    def record_eval(self, val_bpb: float) -> None:
        self.val_bpb = val_bpb
        self.min_val_bpb = val_bpb if self.min_val_bpb is None else min(self.min_val_bpb, val_bpb)

    def record_step(self, step: int, seconds: float) -> None:
        if step >= UNTIMED_STEPS:
            self.training_time += seconds
        else:
            self.startup_time += seconds


@contextmanager
def evaluations(model: torch.nn.Module, loop: LoopState) -> Iterator[None]:
    """Around a step's evaluations: a stop request during one (EvalStopped, on every process alike) ends
    them unfinished, with nothing of them recorded; the model trains again and loop.evals_pending says
    so, for the checkpoint the stop then writes."""
    loop.evals_pending = False
    try:
        yield
    except EvalStopped:
        model.train()
        loop.evals_pending = True
        print0("stopped during the evaluations: a resume runs them first")


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


def add_source_flags(
    parser: argparse.ArgumentParser, default: str | None, choices: tuple[str, ...], shown: str | None = None
) -> None:
    """--source (`shown` says how a None default is resolved), --source-run and --source-step."""
    group = parser.add_argument_group("Source model")
    group.add_argument(
        "--source",
        choices=choices,
        default=default,
        help=f"the stage to start from (default: {shown or default})",
    )
    group.add_argument(
        "--source-run", type=run_name, default=None, help="the run to start from (default: --run)"
    )
    group.add_argument(
        "--source-step", type=CHECKPOINT_STEP, default=None, help="its checkpoint step (default: latest)"
    )


def add_lr_flags(
    parser: argparse.ArgumentParser, defaults: dict[str, tuple[float | None, str]]
) -> argparse._ArgumentGroup:
    """A chat stage's LR flags (no batch factor) and --init-lr-frac; `defaults` gives each one's default
    and how its help shows it (a None default is resolved by the program)."""
    group = parser.add_argument_group("Optimization")
    helps = [
        "Muon LR of the matrices",
        "AdamW LR of the token embeddings",
        "AdamW LR of the lm_head",
        "AdamW LR of the per-layer scalars",
    ]
    for name, text in zip(LR_NAMES, helps, strict=True):
        default, shown = defaults[name]
        group.add_argument(
            f"--{name.replace('_', '-')}",
            type=LEARNING_RATE,
            default=default,
            help=f"{text} (default: {shown})",
        )
    default, shown = defaults["init_lr_frac"]
    group.add_argument(
        "--init-lr-frac",
        type=Bounded(float, maximum=10, exclusive_minimum=0),
        default=default,
        help=f"every LR × this, smear/backout's 0.2 included (default: {shown})",
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
