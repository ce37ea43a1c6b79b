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
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

import torch

from trainer import checkpoint, core_eval, dataset, eval_budget, fp8, scaling, task_data, training, user_files
from trainer.common import (
    EVAL_TOKENS,
    EVERY_N_STEPS,
    FRACTION,
    LEARNING_RATE,
    MAX_STEPS,
    PER_TASK,
    Bounded,
    add_run_flag,
    print0,
    progress_bar,
)
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
    compile_model,
    init_wandb,
    peak_flops,
)
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer
from trainer.training import (
    UNTIMED_STEPS,
    LoopState,
    MetricsLog,
    Recipe,
    format_duration,
    grad_scaler,
    resume_step,
    rounded,
    stop_if_diverged,
    summary_times,
    train_step,
)

PHASE = "base"
# The reference's evaluation budgets (nanochat 92d63d4, scripts/base_train.py): the defaults on CUDA.
REFERENCE_EVAL_TOKENS = 80 * 2**19
REFERENCE_CORE_PER_TASK = 500
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
group.add_argument(
    "--depth", type=Bounded(int, 1, 64), default=12, help="transformer layers: the one dial (default: 12)"
)
group.add_argument(
    "--head-dim", type=Bounded(int, 16, 256), default=128, help="channels per attention head (default: 128)"
)
group.add_argument(
    "--aspect-ratio",
    type=Bounded(int, 1, 1024),
    default=64,
    help="width = aspect ratio × depth (default: 64)",
)
group.add_argument(
    "--n-kv-head",
    type=Bounded(int, 1, 1024),
    default=None,
    help="key/value heads for GQA, a divisor of the heads (default: = heads)",
)
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
group.add_argument(
    "--layer-scalars",
    action=switch,
    default=True,
    help="learned per-layer resid_λ and x0_λ (off, with --window-pattern L --no-value-embeds --no-smear "
    "--no-backout --qk-scale 1: the architecture transformers' built-in NanoChat class computes)",
)
group.add_argument(
    "--softcap",
    type=Bounded(float, maximum=1000, exclusive_minimum=0),
    default=15.0,
    help="logit soft-cap 15·tanh(z/15) (default: 15)",
)
group.add_argument(
    "--rope-base",
    type=Bounded(float, maximum=1e9, exclusive_minimum=1),
    default=100_000.0,
    help="rotary base (default: 100,000)",
)
group.add_argument(
    "--qk-scale",
    type=Bounded(float, maximum=100, exclusive_minimum=0),
    default=1.2,
    help="q and k scale after QK-norm (default: 1.2)",
)
group = parser.add_argument_group("Data")
user_files.add_corpus_flag(group)
group.add_argument(
    "--split-docs",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="train on long documents as BOS-started row-sized chunks instead of cropping them (default: off)",
)
group = parser.add_argument_group("Precision")
group.add_argument(
    "--fp8",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="the attention, MLP and lm_head matmuls of training in float8 with tensorwise dynamic scaling, as "
    "the record speedrun (GPUs of compute capability ≥ 8.9, or the CPU); evaluation stays in --dtype "
    "(default: off)",
)
group = parser.add_argument_group("Horizon")
group.add_argument(
    "--target-param-data-ratio",
    type=Bounded(float, maximum=1000, exclusive_minimum=0),
    default=12.0,
    help="planned tokens per scaling parameter: sets batch size and weight decay, and the steps unless "
    "--num-iterations or --target-flops is given (default: 12, the reference's; it calls 10.5 "
    "compute-optimal, its speedrun uses 8)",
)
group.add_argument(
    "--target-flops",
    type=Bounded(float, maximum=1e30, exclusive_minimum=0),
    default=None,
    help="training FLOPs budget: steps = round(F / (FLOPs per token × batch)) unless --num-iterations is "
    "given; batch size and weight decay still come from the planned horizon (default: off)",
)
group = parser.add_argument_group("Optimization")
group.add_argument(
    "--matrix-lr", type=LEARNING_RATE, default=0.02, help="Muon LR before batch scaling (default: 0.02)"
)
group.add_argument(
    "--embedding-lr", type=LEARNING_RATE, default=0.3, help="token embedding AdamW LR (default: 0.3)"
)
group.add_argument(
    "--unembedding-lr", type=LEARNING_RATE, default=0.008, help="lm_head AdamW LR (default: 0.008)"
)
group.add_argument(
    "--scalar-lr", type=LEARNING_RATE, default=0.5, help="per-layer scalar AdamW LR (default: 0.5)"
)
group.add_argument(
    "--weight-decay", type=Bounded(float, 0, 10), default=None, help="Muon weight decay (default: derived)"
)
group.add_argument(
    "--weight-decay-horizon",
    choices=["planned", "trained"],
    default="planned",
    help="tokens in the derived weight decay's D: the planned horizon (the reference) or the tokens this "
    "run trains on (default: planned)",
)
group.add_argument(
    "--warmup-steps",
    type=Bounded(int, 0, MAX_STEPS),
    default=40,
    help="linear LR warm-up steps (default: 40)",
)
group.add_argument(
    "--warmdown-ratio", type=FRACTION, default=0.65, help="share of steps in warm-down (default: 0.65)"
)
group.add_argument(
    "--final-lr-frac", type=FRACTION, default=0.05, help="LR at the end, × peak (default: 0.05)"
)
group = parser.add_argument_group("Evaluation")
group.add_argument(
    "--eval-tokens",
    type=EVAL_TOKENS,
    default=None,
    help="val tokens per bpb evaluation (default: the reference's 41.9M on CUDA, sized to the run elsewhere)",
)
group.add_argument(
    "--core-metric-every",
    type=EVERY_N_STEPS,
    default=2000,
    help="steps between CORE evaluations (and one at the end), 0: only at the end, -1: off (default: 2000)",
)
group.add_argument(
    "--core-metric-max-per-task",
    type=PER_TASK,
    default=None,
    help="CORE examples per task, -1: all (default: the reference's 500 on CUDA, sized to the run elsewhere)",
)
group.add_argument(
    "--sample-every",
    type=EVERY_N_STEPS,
    default=2000,
    help="steps between samples (and at the end), 0: only at the end, -1: off (default: 2000)",
)
add_training_flags(parser)


def recipe_of(args: argparse.Namespace, horizon: scaling.Horizon) -> Recipe:
    """The batch and LRs this run trains with, saved with its checkpoints for the chat stages."""
    return Recipe(
        max_seq_len=args.max_seq_len,
        device_batch_size=args.device_batch_size,
        total_batch_size=horizon.total_batch_size,
        lr_scale=horizon.lr_scale,
        matrix_lr=args.matrix_lr,
        embedding_lr=args.embedding_lr,
        unembedding_lr=args.unembedding_lr,
        scalar_lr=args.scalar_lr,
    )


def build_optimizer(model: GPT, args: argparse.Namespace, horizon: scaling.Horizon) -> MuonAdamW:
    weight_decay = horizon.weight_decay if args.weight_decay is None else args.weight_decay
    return training.build_optimizer(model, recipe_of(args, horizon).learning_rates(), weight_decay)


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


def plan(
    args: argparse.Namespace, vocab_size: int, runtime: Runtime
) -> tuple[GPTConfig, scaling.Horizon, int]:
    """What --depth and the flags resolve to: model config, horizon, gradient accumulation steps. Printed."""
    architecture = {
        "window_pattern": args.window_pattern,
        "value_embeds": args.value_embeds,
        "smear": args.smear,
        "backout": args.backout,
        "layer_scalars": args.layer_scalars,
        "softcap": args.softcap,
        "rope_base": args.rope_base,
        "qk_scale": args.qk_scale,
    }
    shape = (vocab_size, args.max_seq_len, args.head_dim, args.aspect_ratio)
    config = scaling.model_config(args.depth, *shape, args.n_kv_head, **architecture)
    shapes = scaling.meta_model(config)
    num_params, flops_per_token = shapes.num_scaling_params(), shapes.estimate_flops()
    horizon = scaling.horizon(
        num_params,
        scaling.reference_params(*shape, **architecture),
        args.target_param_data_ratio,
        args.total_batch_size,
        args.num_iterations,
        args.weight_decay_horizon,
        args.target_flops,
        flops_per_token,
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
    steps_from = (
        "--num-iterations" if args.num_iterations else "--target-flops" if args.target_flops else "ratio"
    )
    print0(
        f"training: {horizon.num_iterations:,} steps (from {steps_from}) × {horizon.total_batch_size:,} "
        f"tokens = {horizon.tokens:,} tokens (D/N {horizon.tokens / num_params:.2f}) | "
        f"{flops_per_token * horizon.tokens:.3e} FLOPs ({flops_per_token:.3e} per token)"
    )
    print0(
        f"batch: {horizon.total_batch_size:,} tokens/step = {accumulation} accumulation step(s) × "
        f"{micro_tokens:,} | LR scale {horizon.lr_scale:.4f} | Muon weight decay {horizon.weight_decay:.4f} "
        f"({args.weight_decay_horizon} horizon)"
    )
    print0(f"runtime: {runtime.device} × {runtime.world_size} process(es) | compute dtype {runtime.dtype}")
    return config, horizon, accumulation


def core_bundle(settings: TrainerSettings) -> tuple[Path, str]:
    """The eval bundle and task list for CORE during training, found (or downloaded) before training."""
    try:
        bundle = task_data.eval_bundle_dir(settings)
        return bundle, core_eval.choose_config(bundle, "core.yaml", print0)
    except OSError as error:  # FileNotFoundError included
        message = f"CORE during training needs the eval bundle: {error}; or pass --core-metric-every -1"
        raise SystemExit(message) from error


def evaluation_budget(
    args: argparse.Namespace,
    horizon: scaling.Horizon,
    core_tasks: tuple[Path, str] | None,
    device: torch.device,
) -> tuple[int | None, int | None]:
    """Val tokens per bpb evaluation and CORE examples per task (None: that evaluation is off): as given,
    the reference's on CUDA, else sized to this run (eval_budget.py). Printed with the cadences."""
    steps, batch_tokens = horizon.num_iterations, horizon.total_batch_size
    val_bpb = eval_budget.cadence(args.eval_every, steps, at_start=True)
    core = eval_budget.cadence(args.core_metric_every, steps)
    samples = eval_budget.cadence(args.sample_every, steps)
    print0(f"evaluation: val bpb {val_bpb} | CORE {core} | samples {samples}")
    eval_tokens = eval_budget.val_tokens(
        args.eval_every, args.eval_tokens, REFERENCE_EVAL_TOKENS, steps, batch_tokens, device
    )
    if core_tasks is None:
        return eval_tokens, None
    tokens = eval_budget.tokens_per_evaluation(args.core_metric_every, steps, batch_tokens)
    task_count = len(core_eval.load_tasks(*core_tasks))
    core_per_task = eval_budget.pick(
        "--core-metric-max-per-task",
        args.core_metric_max_per_task,
        REFERENCE_CORE_PER_TASK,
        eval_budget.core_examples(tokens, task_count),
        f"the {tokens:,} tokens trained per evaluation over {task_count} tasks of "
        f"~{eval_budget.CORE_EXAMPLE_TOKENS:,} tokens an example",
        device,
    )
    return eval_tokens, core_per_task


@dataclass
class BaseLoopState(LoopState):
    core: float | None = None


def main(argv: list[str] | None = None) -> dict:
    args = parser.parse_args(argv)
    return training.run_training("base_train", args, train)


def train(args: argparse.Namespace, settings: TrainerSettings, runtime: Runtime, stop: StopRequest) -> dict:
    settings = user_files.with_corpus(settings, args.corpus)
    out_dir = settings.run_dir(args.run) / PHASE
    tokenizer = Tokenizer.load(settings.run_dir(args.run) / "tokenizer")
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=runtime.device)
    config, horizon, accumulation = plan(args, tokenizer.vocab_size, runtime)

    torch.manual_seed(args.seed)
    model = GPT(config)
    model.init_weights()
    model.set_compute_dtype(runtime.dtype)
    model.to(runtime.device)
    if args.fp8:  # before compiling; the weights stay the model's fp32 masters
        fp8.check_device(runtime.device)
        converted, linears = fp8.convert(model)
        print0(
            f"fp8: {converted} of {linears} linear layers train in float8 (tensorwise dynamic scaling); "
            "the rest are too small"
        )
    optimizer = build_optimizer(model, args, horizon)
    train_model = compile_model(model, args.compile, runtime)
    scaler = grad_scaler(runtime)
    # Counted from the parameters, so float8 layers count too: the reference counts Linear modules by
    # class, which drops its converted ones, so its MFU (and --target-flops steps) under --fp8 are off.
    flops_per_token = model.estimate_flops()
    peak, peak_source = peak_flops(runtime)
    print0(f"FLOPs per token {flops_per_token:.3e} | peak {peak:.3e} FLOP/s per device ({peak_source})")

    start_step, loader_state, loop = resume_step(args, out_dir), None, BaseLoopState()
    resuming = start_step is not None
    if resuming:
        checkpoint.load_weights(out_dir, start_step, model)
        loader_state = checkpoint.load_training_state(out_dir, start_step, optimizer, runtime, scaler)
        loop = BaseLoopState(**checkpoint.read_meta(out_dir, start_step)["loop_state"])
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
    # Rank 0 plans the shards (and downloads the missing ones in the background); every rank reads them.
    shard_plan = (
        dataset.plan_training_shards(settings, tokenizer, horizon.tokens) if runtime.is_master else None
    )
    train_shards = runtime.broadcast(shard_plan.shards if shard_plan else None)
    download = (
        dataset.ShardDownload(settings, shard_plan.missing) if shard_plan and shard_plan.missing else None
    )
    train_loader = PackingLoader(
        tokenizer,
        train_shards,
        split_docs=args.split_docs,
        wait_for_shard=lambda path: dataset.wait_for_shard(path, download),
        state=loader_state,
        **loader_args,
    )
    data_pass = train_loader.epoch  # a new pass over the data is logged and recorded when it begins
    val_shards = dataset.list_shards(settings, "val")
    core_tasks = core_bundle(settings) if args.core_metric_every >= 0 else None
    eval_tokens, core_per_task = evaluation_budget(args, horizon, core_tasks, runtime.device)
    wandb_run = init_wandb(settings, args.run, {**vars(args), "model": config.to_dict()}, runtime)
    total = horizon.num_iterations
    bar = progress_bar(total=total, initial=start_step, unit="step") if sys.stderr.isatty() else None
    log = bar.write if bar is not None else print0

    step_times: list[float] = []
    invocation_start, wall_before = time.time(), loop.wall_time
    for step in range(start_step, total + 1):
        last = step == total
        stopping = runtime.any(stop.requested)
        # The checkpoint we resumed from was written after this step's evaluation and sampling (unless a
        # stop cut them short).
        done_before_checkpoint = resuming and step == start_step and not loop.evals_pending
        with training.evaluations(model, loop):
            if not done_before_checkpoint and eval_budget.due(args.eval_every, step, last, at_start=True):
                model.eval()  # the training model, compiled when training is: the reference evaluates so
                val_loader = PackingLoader(tokenizer, val_shards, **loader_args)
                eval_steps = max(1, eval_tokens // (horizon.total_batch_size // accumulation))
                val_bpb = evaluate_bpb(train_model, val_loader, eval_steps, token_bytes, stop)
                model.train()
                loop.record_eval(val_bpb)
                log(f"step {step}/{total} | val bpb {val_bpb:.4f}")
                metrics.write({"step": step, "val_bpb": val_bpb})
                wandb_run.log({"val/bpb": val_bpb}, step=step)
            sample_now = eval_budget.due(args.sample_every, step, last)
            if runtime.is_master and not done_before_checkpoint and sample_now:
                model.eval()
                for line in sample(model, tokenizer):
                    log(f"  sample | {line}")
                model.train()
            if not done_before_checkpoint and eval_budget.due(args.core_metric_every, step, last):
                model.eval()  # the uncompiled model: CORE's prompts change shape all the time
                bundle, core_config = core_tasks
                results = core_eval.evaluate_core(
                    model, tokenizer, bundle, runtime.device, core_config, core_per_task, log, stop
                )
                model.train()
                loop.core = results["core"]
                log(f"step {step}/{total} | CORE {loop.core:.4f}")
                metrics.write({"step": step, "core": loop.core})
                wandb_run.log({"core_metric": loop.core}, step=step)
        stopping = stopping or loop.evals_pending
        if step > start_step and (last or stopping or (args.save_every > 0 and step % args.save_every == 0)):
            loop.wall_time = wall_before + time.time() - invocation_start
            meta = {
                "phase": PHASE,
                "args": vars(args),
                "val_bpb": loop.val_bpb,
                "tokens_seen": step * horizon.total_batch_size,
                "loop_state": asdict(loop),
                "recipe": asdict(recipe_of(args, horizon)),
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
        stop_if_diverged(loss, step + 1)
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
            | {"progress": (step + 1) / total}
        )
        wandb_run.log(
            {"train/loss": loss, "train/lrm": lrm, "train/mfu": mfu, "train/tok_per_s": tok_per_s},
            step=step + 1,
        )
        if train_loader.epoch != data_pass:
            data_pass = train_loader.epoch
            log(
                f"step {step + 1}/{total} | data: pass {data_pass + 1} over the training shards begins "
                "(repeating data)"
            )
            metrics.write({"step": step + 1, "data_pass": data_pass + 1})
        if bar is not None:
            bar.update(1)

    if bar is not None:
        bar.close()
    wandb_run.finish()
    if stopping and (not last or loop.evals_pending):
        training.exit_stopped(runtime, step)
    tok_per_s = horizon.total_batch_size / median(step_times) if step_times else None
    summary = {
        "depth": config.n_layer,
        "width": config.n_embd,
        "steps": step,
        "tokens": step * horizon.total_batch_size,
        "total_batch_size": horizon.total_batch_size,
        "val_bpb": rounded(loop.val_bpb),
        "min_val_bpb": rounded(loop.min_val_bpb),
        "core": rounded(loop.core),
        "tok_per_s": round(tok_per_s) if tok_per_s else None,
        "mfu": round(flops_per_token * tok_per_s / (peak * runtime.world_size), 4) if tok_per_s else None,
        **summary_times(loop, wall_before + time.time() - invocation_start),
        "crop_fraction": round(train_loader.crop_fraction, 4),
        "data_passes": train_loader.epoch + 1,  # begun: 1 when no document was read twice
        **training.runtime_summary(runtime),
        "fp8": args.fp8,
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
