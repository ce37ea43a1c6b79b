"""
Base pretraining: a GPT of the given --depth trained on the pretraining shards with the recipe's
Muon+AdamW optimizer and schedules. Checkpoints resume exactly; SIGTERM saves one and stops.

    python -m trainer.base_train --run demo --depth 12
    torchrun --standalone --nproc_per_node=8 -m trainer.base_train -- --run demo --depth 20
    python -m trainer.base_train --run cpu --depth 4 --head-dim 64 --max-seq-len 512 \\
        --device-batch-size 8 --total-batch-size 4096 --num-iterations 300       # a CPU run
"""

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

import torch
import torch.distributed as dist

from trainer import checkpoint, core_eval, dataset, scaling, task_data
from trainer.common import add_run_flag, print0, print_banner, progress_bar
from trainer.dataloader import PackingLoader
from trainer.engine import Engine
from trainer.gpt import GPT, GPTConfig
from trainer.loss_eval import evaluate_bpb
from trainer.optim import MuonAdamW
from trainer.report import write_section
from trainer.runtime import (
    Runtime,
    StopRequest,
    add_training_flags,
    init_wandb,
    peak_flops,
    setup_runtime,
    shutdown,
)
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer

PHASE = "base"
# The reference's "total training time" leaves out steps 0-10 (its `step > 10`): compilation, warm-up.
UNTIMED_STEPS = 11
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "If 5*x + 3 = 13, then x is",
]

parser = argparse.ArgumentParser(description="Pretrain a GPT of the given depth on the pretraining shards.")
add_run_flag(parser)
group = parser.add_argument_group("Model")
group.add_argument("--depth", type=int, default=12, help="transformer layers: the one dial (default: 12)")
group.add_argument("--head-dim", type=int, default=128, help="channels per attention head (default: 128)")
group.add_argument("--aspect-ratio", type=int, default=64, help="width = aspect ratio × depth (default: 64)")
group.add_argument("--n-kv-head", type=int, default=None, help="key/value heads for GQA (default: = heads)")
group.add_argument(
    "--window-pattern",
    default="SSSL",
    help="attention windows tiled over layers, S=¼ context, L=full (default: SSSL)",
)
switch = argparse.BooleanOptionalAction
group.add_argument(
    "--value-embeds", action=switch, default=True, help="value embeddings on alternating layers"
)
group.add_argument("--smear", action=switch, default=True, help="gated mix of the previous token's embedding")
group.add_argument(
    "--backout", action=switch, default=True, help="subtract the mid-network residual before the head"
)
group.add_argument("--softcap", type=float, default=15.0, help="logit soft-cap 15·tanh(z/15) (default: 15)")
group.add_argument("--rope-base", type=float, default=100_000.0, help="rotary base (default: 100,000)")
group.add_argument("--qk-scale", type=float, default=1.2, help="q and k scale after QK-norm (default: 1.2)")
group = parser.add_argument_group("Data")
group.add_argument(
    "--split-docs",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="train on long documents as BOS-started row-sized chunks instead of cropping them (default: off)",
)
group = parser.add_argument_group("Horizon")
group.add_argument(
    "--target-param-data-ratio",
    type=float,
    default=10.5,
    help="planned tokens per scaling parameter: sets batch size and weight decay, and the steps unless "
    "--num-iterations is given (default: 10.5)",
)
group = parser.add_argument_group("Optimization")
group.add_argument(
    "--matrix-lr", type=float, default=0.02, help="Muon LR before batch scaling (default: 0.02)"
)
group.add_argument("--embedding-lr", type=float, default=0.3, help="token embedding AdamW LR (default: 0.3)")
group.add_argument("--unembedding-lr", type=float, default=0.008, help="lm_head AdamW LR (default: 0.008)")
group.add_argument("--scalar-lr", type=float, default=0.5, help="per-layer scalar AdamW LR (default: 0.5)")
group.add_argument("--weight-decay", type=float, default=None, help="Muon weight decay (default: derived)")
group.add_argument(
    "--weight-decay-horizon",
    choices=["planned", "trained"],
    default="planned",
    help="tokens in the derived weight decay's D: the planned horizon (the reference) or the tokens this "
    "run trains on (default: planned)",
)
group.add_argument("--warmup-steps", type=int, default=40, help="linear LR warm-up steps (default: 40)")
group.add_argument(
    "--warmdown-ratio", type=float, default=0.65, help="share of steps in warm-down (default: 0.65)"
)
group.add_argument("--final-lr-frac", type=float, default=0.05, help="LR at the end, × peak (default: 0.05)")
group = parser.add_argument_group("Evaluation")
group.add_argument(
    "--eval-tokens", type=int, default=20 * 2**19, help="val tokens per bpb evaluation (default: 10.5M)"
)
group.add_argument(
    "--core-metric-every",
    type=int,
    default=2000,
    help="steps between CORE evaluations, -1: off (default: 2000)",
)
group.add_argument(
    "--core-metric-max-per-task", type=int, default=500, help="CORE examples per task (default: 500)"
)
add_training_flags(parser)


def build_optimizer(model: GPT, args: argparse.Namespace, horizon: scaling.Horizon) -> MuonAdamW:
    """The recipe's parameter groups: LRs × √(B/B_ref) (smear/backout excepted), the embeddings' and
    lm_head's also × (width/768)^−½."""
    s = horizon.lr_scale
    width_scale = (model.config.n_embd / 768) ** -0.5
    embedding_lr = args.embedding_lr * width_scale * s

    def adamw(params, lr, betas, weight_decay):
        return {
            "kind": "adamw",
            "params": params,
            "lr": lr,
            "betas": betas,
            "eps": 1e-10,
            "weight_decay": weight_decay,
        }

    groups = [
        adamw([model.lm_head.weight], args.unembedding_lr * width_scale * s, (0.8, 0.96), 0.01),
        adamw([model.wte.weight], embedding_lr, (0.8, 0.995), 0.001),
        adamw([model.resid_lambdas], args.scalar_lr * 0.01 * s, (0.8, 0.95), 0.05),
        adamw([model.x0_lambdas], args.scalar_lr * s, (0.96, 0.95), 0.0),
    ]
    if model.value_embeds:
        groups.append(adamw(list(model.value_embeds.parameters()), embedding_lr / 2, (0.8, 0.995), 0.01))
    small = [p for p in (model.smear_lambda, model.backout_lambda) if p is not None]
    if model.smear_gate is not None:
        small.append(model.smear_gate.weight)
    if small:  # the recipe's one LR not scaled by the batch factor
        groups.append(adamw(small, 0.2, (0.8, 0.95), 0.0))
    weight_decay = horizon.weight_decay if args.weight_decay is None else args.weight_decay
    matrices = model.matrix_params()
    for shape in sorted({tuple(p.shape) for p in matrices}):
        params = [p for p in matrices if tuple(p.shape) == shape]
        groups.append(
            {
                "kind": "muon",
                "params": params,
                "lr": args.matrix_lr * s,
                "momentum": 0.95,
                "beta2": 0.9,
                "weight_decay": weight_decay,
                "ns_steps": 5,
            }
        )
    for group in groups:
        group["base_lr"], group["base_weight_decay"] = group["lr"], group["weight_decay"]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())), "a parameter has no group"
    return MuonAdamW(groups, compute_dtype=model.compute_dtype)


def apply_schedules(optimizer: MuonAdamW, step: int, total: int, args: argparse.Namespace) -> float:
    lrm = scaling.lr_multiplier(step, total, args.warmup_steps, args.warmdown_ratio, args.final_lr_frac)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lrm
        if group["kind"] == "muon":
            group["momentum"] = scaling.muon_momentum(step, total, args.warmdown_ratio)
            group["weight_decay"] = group["base_weight_decay"] * scaling.weight_decay_multiplier(step, total)
    return lrm


def sample(model: GPT, tokenizer: Tokenizer, max_tokens: int = 16) -> list[str]:
    """Greedy completions of fixed prompts: a quick look at what the model knows."""
    engine, lines = Engine(model, tokenizer), []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt, prepend=tokenizer.bos_token_id)
        (completion,) = engine.complete(ids, max_tokens=max_tokens, temperature=0)
        lines.append(f"{prompt} → {tokenizer.decode([t.id for t in completion])!r}")
    return lines


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class MetricsLog:
    """runs/<run>/base/metrics.jsonl, one JSON object per line; rank 0 writes."""

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


def plan(
    args: argparse.Namespace, vocab_size: int, runtime: Runtime
) -> tuple[GPTConfig, scaling.Horizon, int]:
    """What --depth and the flags resolve to: model config, horizon, gradient accumulation steps. Printed."""
    architecture = {
        "window_pattern": args.window_pattern,
        "value_embeds": args.value_embeds,
        "smear": args.smear,
        "backout": args.backout,
        "softcap": args.softcap,
        "rope_base": args.rope_base,
        "qk_scale": args.qk_scale,
    }
    shape = (vocab_size, args.max_seq_len, args.head_dim, args.aspect_ratio)
    config = scaling.model_config(args.depth, *shape, args.n_kv_head, **architecture)
    num_params = scaling.scaling_params(config)
    horizon = scaling.horizon(
        num_params,
        scaling.reference_params(*shape, **architecture),
        args.target_param_data_ratio,
        args.total_batch_size,
        args.num_iterations,
        args.weight_decay_horizon,
    )
    micro_tokens = args.device_batch_size * args.max_seq_len * runtime.world_size
    if horizon.total_batch_size % micro_tokens:
        raise SystemExit(
            f"--total-batch-size {horizon.total_batch_size:,} must be a multiple of device batch × seq len × "
            f"processes = {micro_tokens:,}"
        )
    accumulation = horizon.total_batch_size // micro_tokens
    print0(
        f"model: depth {config.n_layer}, width {config.n_embd}, heads {config.n_head} "
        f"(kv {config.n_kv_head}), head dim {config.head_dim}, windows {config.window_sizes()}, "
        f"vocab {config.vocab_size:,}"
    )
    print0(
        f"horizon: N {num_params:,} scaling params | planned D {horizon.planned_tokens:,} tokens "
        f"(ratio {args.target_param_data_ratio}) | reference d12 D_ref {horizon.reference_tokens:,.0f}"
    )
    print0(
        f"training: {horizon.num_iterations:,} steps × {horizon.total_batch_size:,} tokens = "
        f"{horizon.tokens:,} tokens (D/N {horizon.tokens / num_params:.2f})"
    )
    print0(
        f"batch: {horizon.total_batch_size:,} tokens/step = {accumulation} accumulation step(s) × "
        f"{micro_tokens:,} | LR scale {horizon.lr_scale:.4f} | Muon weight decay {horizon.weight_decay:.4f} "
        f"({args.weight_decay_horizon} horizon)"
    )
    print0(f"runtime: {runtime.device} × {runtime.world_size} process(es) | compute dtype {runtime.dtype}")
    return config, horizon, accumulation


def resume_step(args: argparse.Namespace, out_dir: Path) -> int | None:
    """The checkpoint to continue from: --resume-from-step, or the latest with --resume, or None."""
    if args.resume_from_step is not None:
        return checkpoint.resolve_step(out_dir, args.resume_from_step)
    steps = checkpoint.list_steps(out_dir)
    if args.resume and not steps:
        print0(f"--resume: no checkpoint in {out_dir} yet, starting from step 0")
    return steps[-1] if args.resume and steps else None


def core_bundle(settings: TrainerSettings) -> tuple[Path, str]:
    """The eval bundle and task list for CORE during training, found (or downloaded) before training."""
    try:
        bundle = task_data.eval_bundle_dir(settings)
        return bundle, core_eval.choose_config(bundle, "core.yaml", print0)
    except OSError as error:  # FileNotFoundError included
        message = f"CORE during training needs the eval bundle: {error}; or pass --core-metric-every -1"
        raise SystemExit(message) from error


@dataclass
class LoopState:
    """What the loop carries across steps besides model, optimizer and data; saved with checkpoints, so a
    resumed run reports what an uninterrupted one would."""

    val_bpb: float | None = None
    min_val_bpb: float | None = None
    core: float | None = None
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
    return total_loss.item()  # one device sync per step, not one per micro-batch


def main(argv: list[str] | None = None) -> dict:
    args = parser.parse_args(argv)
    runtime = setup_runtime(args.device, args.dtype)
    settings = TrainerSettings()
    print_banner("base_train", args, settings)
    stop = StopRequest()
    try:
        return train(args, settings, runtime, stop)
    finally:
        shutdown(runtime)


def train(args: argparse.Namespace, settings: TrainerSettings, runtime: Runtime, stop: StopRequest) -> dict:
    out_dir = settings.run_dir(args.run) / PHASE
    tokenizer = Tokenizer.load(settings.run_dir(args.run) / "tokenizer")
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=runtime.device)
    config, horizon, accumulation = plan(args, tokenizer.vocab_size, runtime)

    torch.manual_seed(args.seed)
    model = GPT(config)
    model.init_weights()
    model.set_compute_dtype(runtime.dtype)
    model.to(runtime.device)
    optimizer = build_optimizer(model, args, horizon)
    use_compile = args.compile if args.compile is not None else runtime.device.type == "cuda"
    train_model = torch.compile(model, dynamic=False) if use_compile else model
    # fp16's narrow range needs loss scaling; bf16 has fp32's exponent range and needs none.
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.dtype == torch.float16 else None
    flops_per_token = model.estimate_flops()
    peak, peak_source = peak_flops(runtime)
    print0(f"FLOPs per token {flops_per_token:.3e} | peak {peak:.3e} FLOP/s per device ({peak_source})")

    start_step, loader_state, loop = resume_step(args, out_dir), None, LoopState()
    resuming = start_step is not None
    if resuming:
        checkpoint.load_weights(out_dir, start_step, model)
        loader_state = checkpoint.load_training_state(out_dir, start_step, optimizer, runtime, scaler)
        loop = LoopState(**checkpoint.read_meta(out_dir, start_step)["loop_state"])
        print0(f"resumed from {checkpoint.step_dir(out_dir, start_step)}")
    metrics = MetricsLog(out_dir / "metrics.jsonl", runtime, start_step)
    start_step = start_step or 0

    loader_args = {
        "batch_size": args.device_batch_size,
        "seq_len": args.max_seq_len,
        "rank": runtime.rank,
        "world_size": runtime.world_size,
        "device": runtime.device,
    }
    train_shards = dataset.list_shards(settings, "train")
    train_loader = PackingLoader(
        tokenizer, train_shards, split_docs=args.split_docs, state=loader_state, **loader_args
    )
    val_shards = dataset.list_shards(settings, "val")
    eval_steps = max(1, args.eval_tokens // (horizon.total_batch_size // accumulation))
    core_tasks = core_bundle(settings) if args.core_metric_every > 0 else None
    wandb_run = init_wandb(settings, args.run, {**vars(args), "model": config.to_dict()}, runtime)
    total = horizon.num_iterations
    bar = progress_bar(total=total, initial=start_step, unit="step") if sys.stderr.isatty() else None
    log = bar.write if bar is not None else print0

    step_times: list[float] = []
    invocation_start, wall_before = time.time(), loop.wall_time
    for step in range(start_step, total + 1):
        last = step == total
        stopping = runtime.any(stop.requested)
        # The checkpoint we resumed from was written after this step's evaluation and sampling.
        done_before_checkpoint = resuming and step == start_step
        if not done_before_checkpoint and (last or (args.eval_every > 0 and step % args.eval_every == 0)):
            model.eval()  # the training model, compiled when training is: the reference evaluates so
            val_loader = PackingLoader(tokenizer, val_shards, **loader_args)
            val_bpb = evaluate_bpb(train_model, val_loader, eval_steps, token_bytes)
            model.train()
            loop.record_eval(val_bpb)
            log(f"step {step}/{total} | val bpb {val_bpb:.4f}")
            metrics.write({"step": step, "val_bpb": val_bpb})
            wandb_run.log({"val/bpb": val_bpb}, step=step)
        sample_now = last or (args.sample_every > 0 and step > 0 and step % args.sample_every == 0)
        if runtime.is_master and not done_before_checkpoint and sample_now:
            model.eval()
            for line in sample(model, tokenizer):
                log(f"  sample | {line}")
            model.train()
        core_now = last or (step > 0 and step % max(1, args.core_metric_every) == 0)
        if core_tasks is not None and not done_before_checkpoint and core_now:
            model.eval()  # the uncompiled model: CORE's prompts change shape all the time
            bundle, core_config = core_tasks
            results = core_eval.evaluate_core(
                model,
                tokenizer,
                bundle,
                config.sequence_len,
                runtime.device,
                core_config,
                args.core_metric_max_per_task,
                log,
            )
            model.train()
            loop.core = results["core"]
            log(f"step {step}/{total} | CORE {loop.core:.4f}")
            metrics.write({"step": step, "core": loop.core})
            wandb_run.log({"core_metric": loop.core}, step=step)
        if step > start_step and (last or stopping or (args.save_every > 0 and step % args.save_every == 0)):
            loop.wall_time = wall_before + time.time() - invocation_start
            meta = {
                "phase": PHASE,
                "args": vars(args),
                "val_bpb": loop.val_bpb,
                "tokens_seen": step * horizon.total_batch_size,
                "loop_state": asdict(loop),
            }
            saved = checkpoint.save(
                out_dir,
                step,
                model,
                optimizer,
                train_loader.state_dict(),
                meta,
                runtime,
                args.keep_checkpoints,
                scaler,
            )
            log(f"step {step}/{total} | checkpoint {saved}")
        if last or stopping:
            break

        runtime.synchronize()
        t0 = time.time()
        lrm = apply_schedules(optimizer, step, total, args)
        loss = runtime.mean(train_step(train_model, train_loader, optimizer, accumulation, scaler, runtime))
        runtime.synchronize()
        dt = time.time() - t0
        step_times.append(dt)
        loop.record_step(step, dt)
        tok_per_s = horizon.total_batch_size / dt
        mfu = flops_per_token * tok_per_s / (peak * runtime.world_size)
        eta = format_duration((total - step - 1) * median(step_times[-50:]))  # median: early steps compile
        log(
            f"step {step + 1}/{total} | loss {loss:.4f} | lrm {lrm:.2f} | dt {dt:.2f}s | "
            f"tok/s {tok_per_s:,.0f} | mfu {100 * mfu:.1f}% | eta {eta}"
        )
        metrics.write(
            {"step": step + 1, "loss": loss, "lrm": lrm, "dt": dt, "tok_per_s": tok_per_s, "mfu": mfu}
        )
        wandb_run.log(
            {"train/loss": loss, "train/lrm": lrm, "train/mfu": mfu, "train/tok_per_s": tok_per_s},
            step=step + 1,
        )
        if bar is not None:
            bar.update(1)

    if bar is not None:
        bar.close()
    wandb_run.finish()
    if stopping and not last:
        print0(f"stopped at step {step}; resume with --resume")
        shutdown(runtime)
        sys.exit(143)
    tok_per_s = horizon.total_batch_size / median(step_times) if step_times else None
    summary = {
        "depth": config.n_layer,
        "width": config.n_embd,
        "steps": step,
        "tokens": step * horizon.total_batch_size,
        "total_batch_size": horizon.total_batch_size,
        "val_bpb": round(loop.val_bpb, 4) if loop.val_bpb is not None else None,
        "min_val_bpb": round(loop.min_val_bpb, 4) if loop.min_val_bpb is not None else None,
        "core": round(loop.core, 4) if loop.core is not None else None,
        "tok_per_s": round(tok_per_s) if tok_per_s else None,
        "mfu": round(flops_per_token * tok_per_s / (peak * runtime.world_size), 4) if tok_per_s else None,
        "training_minutes": round(loop.training_time / 60, 2),
        "startup_seconds": round(loop.startup_time, 1),
        "wall_seconds": round(wall_before + time.time() - invocation_start, 1),
        "crop_fraction": round(train_loader.crop_fraction, 4),
        "device": f"{runtime.device} × {runtime.world_size}",
        "gpus": runtime.gpus,
        "dtype": str(runtime.dtype).removeprefix("torch."),
    }
    print0(
        f"training time {loop.training_time / 60:.2f} min (the steps after the first {UNTIMED_STEPS}, as the "
        f"reference counts) | first {UNTIMED_STEPS} steps {loop.startup_time:.1f}s"
    )
    if runtime.is_master:
        write_section(settings, args.run, "base_train", summary, vars(args))
    print0("base_train done: " + json.dumps(summary, ensure_ascii=False))
    return summary


if __name__ == "__main__":
    main()
