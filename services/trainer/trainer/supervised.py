"""
Fine-tuning on conversations, the loop behind the two supervised chat stages:

- mid (trainer.mid_train): from the base model; conversations packed like pretraining (a row is
  topped up with the start of a conversation), full LR, linear warm-down over the last 20%;
- sft (trainer.chat_sft): from the mid model; conversations packed without cutting any (rows padded),
  LR × 0.8, warm-down over the last 50% to 0, ChatCORE measured during training.

Both learn only the assistant's tokens (chat_format's mask), start from the source stage's batch and
LRs (RECIPE.md: inherited from the base run; flags override), warm-start the optimizer's momentum from
the source checkpoint, use no Muon weight decay (pretraining decays it to 0), and by default train one
pass over their task mixture (mixture.py). Checkpoints resume exactly, as in base_train.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

import torch

from trainer import checkpoint, eval_budget, training
from trainer.chat_eval import chatcore
from trainer.chat_eval import evaluate_task as evaluate_chat_task
from trainer.common import (
    EVAL_TOKENS,
    EVERY_N_STEPS,
    FRACTION,
    PER_TASK,
    add_run_flag,
    print0,
    progress_bar,
)
from trainer.conversation_loader import ConversationLoader
from trainer.engine import Engine
from trainer.loss_eval import evaluate_bpb
from trainer.mixture import default_mixture, load_mixture
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
from trainer.tasks import CHAT_TASKS, PUBLISHED_CHATCORE_TASKS, Task
from trainer.tokenizer import Tokenizer
from trainer.training import MetricsLog, format_duration, grad_scaler, resume_step, rounded, summary_times


@dataclass(frozen=True)
class Stage:
    name: str  # its folder under the run, and the report's stage name
    program: str  # its module and report section
    description: str
    source: str  # the stage it starts from by default
    pad: bool  # pad rows instead of cropping a conversation into them
    init_lr_frac: float
    warmdown_ratio: float
    eval_every: int
    chatcore_every: int


STAGES = {
    "mid": Stage(
        "mid", "mid_train", "Midtrain a base model on conversations.", "base", False, 1.0, 0.2, 150, -1
    ),
    "sft": Stage(
        "sft", "chat_sft", "Fine-tune a chat model on a task mixture.", "mid", True, 0.8, 0.5, 200, 200
    ),
}
# The reference's val tokens per bpb evaluation, the defaults on CUDA: its mid_train's (nanochat 348fbb3)
# and its chat_sft's (92d63d4).
REFERENCE_EVAL_TOKENS = {"mid": 20 * 2**19, "sft": 40 * 2**19}
# ChatCORE during SFT as the reference computes it (nanochat 92d63d4, scripts/chat_sft.py): every
# multiple-choice problem and 24 generative ones per task (the defaults on CUDA), replies of up to 512
# tokens.
REFERENCE_CHATCORE_MAX_CAT = -1
REFERENCE_CHATCORE_MAX_SAMPLE = 24
CHATCORE_NEW_TOKENS = 512


def build_parser(stage: Stage) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=stage.description)
    add_run_flag(parser)
    training.add_source_flags(parser, stage.source, ("base", "mid", "sft"))
    group = parser.add_argument_group("Data")
    group.add_argument(
        "--mixture",
        default=None,
        help=f"task mixture file (default: {default_mixture(stage.name).name} beside mixture.py)",
    )
    group = training.add_lr_flags(parser, stage.init_lr_frac)
    group.add_argument(
        "--warmup-ratio", type=FRACTION, default=0.0, help="share of the run in LR warm-up (default: 0)"
    )
    group.add_argument(
        "--warmdown-ratio",
        type=FRACTION,
        default=stage.warmdown_ratio,
        help=f"share of the run in linear warm-down (default: {stage.warmdown_ratio})",
    )
    group.add_argument(
        "--final-lr-frac", type=FRACTION, default=0.0, help="LR at the end, × peak (default: 0)"
    )
    group.add_argument(
        "--load-optimizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start from the source checkpoint's momentum buffers (default: on)",
    )
    add_training_flags(parser, inherited=True)
    parser.set_defaults(eval_every=stage.eval_every, save_every=500)
    group = parser.add_argument_group("Chat evaluation during training")
    reference_tokens = REFERENCE_EVAL_TOKENS[stage.name]
    group.add_argument(
        "--eval-tokens",
        type=EVAL_TOKENS,
        default=None,
        help=f"val tokens per bpb evaluation (default: the reference's {reference_tokens / 1e6:.1f}M on "
        "CUDA, sized to the run elsewhere)",
    )
    group.add_argument(
        "--chatcore-every",
        type=EVERY_N_STEPS,
        default=stage.chatcore_every,
        help="steps between ChatCORE evaluations (and one at the end), 0: only at the end, -1: off "
        f"(default: {stage.chatcore_every})",
    )
    group.add_argument(
        "--chatcore-max-cat",
        type=PER_TASK,
        default=None,
        help="problems per choice task, -1: all (default: all on CUDA, sized to the run elsewhere)",
    )
    group.add_argument(
        "--chatcore-max-sample",
        type=PER_TASK,
        default=None,
        help="problems per generative task, -1: all (default: 24 on CUDA, sized to the run elsewhere)",
    )
    return parser


def lr_multiplier(progress: float, args: argparse.Namespace) -> float:
    """Warm-up, constant, linear warm-down, as a function of the share of the run done (0 → 1)."""
    if progress < args.warmup_ratio:
        return (progress + 1e-8) / args.warmup_ratio
    if progress <= 1.0 - args.warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - args.warmdown_ratio)) / args.warmdown_ratio
    return (1 - decay) + decay * args.final_lr_frac


def muon_momentum(step: int) -> float:
    """0.85 → 0.95 over the first 300 steps (the reference's chat stages)."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def evaluation_budget(
    stage: Stage, args: argparse.Namespace, steps: int, batch_tokens: int, device: torch.device
) -> tuple[int | None, tuple[int, int] | None]:
    """Val tokens per bpb evaluation and ChatCORE's (multiple-choice, generative) problems per task (None:
    that evaluation is off): as given, the reference's on CUDA, else sized to this run (eval_budget.py).
    Printed with the cadences."""
    print0(
        f"evaluation: val bpb {eval_budget.cadence(args.eval_every, steps, at_start=True)} | "
        f"ChatCORE {eval_budget.cadence(args.chatcore_every, steps)}"
    )
    eval_tokens = eval_budget.val_tokens(
        args.eval_every, args.eval_tokens, REFERENCE_EVAL_TOKENS[stage.name], steps, batch_tokens, device
    )
    if args.chatcore_every < 0:
        return eval_tokens, None
    tokens = eval_budget.tokens_per_evaluation(args.chatcore_every, steps, batch_tokens)
    tasks = len(PUBLISHED_CHATCORE_TASKS)
    choice, generative = eval_budget.chatcore_problems(tokens, tasks, CHATCORE_NEW_TOKENS)
    why = f"the {tokens:,} tokens trained per evaluation over {tasks} tasks"
    max_cat = eval_budget.pick(
        "--chatcore-max-cat",
        args.chatcore_max_cat,
        REFERENCE_CHATCORE_MAX_CAT,
        choice,
        f"{why} of ~{eval_budget.CHOICE_PROBLEM_TOKENS} tokens a problem",
        device,
    )
    max_sample = eval_budget.pick(
        "--chatcore-max-sample",
        args.chatcore_max_sample,
        REFERENCE_CHATCORE_MAX_SAMPLE,
        generative,
        f"{why} of ~{CHATCORE_NEW_TOKENS} new tokens × {eval_budget.GENERATED_TOKEN_COST} a problem",
        device,
    )
    return eval_tokens, (max_cat, max_sample)


def evaluate_chatcore(
    model, tokenizer: Tokenizer, tasks: list[Task], runtime: Runtime, limits: tuple[int, int], batch_size: int
) -> dict[str, float]:
    """ChatCORE on the first problems of each task (greedy), as the reference does during SFT; `limits`:
    problems per multiple-choice task and per generative task (-1: all)."""
    engine, accuracies, baselines = Engine(model, tokenizer), {}, {}
    for task in tasks:
        name = task.name
        limit = limits[0] if task.eval_type == "categorical" else limits[1]
        options = argparse.Namespace(
            max_problems=limit if limit > 0 else None,  # -1 (or 0, as for CORE): all
            batch_size=batch_size,
            num_samples=1,
            max_new_tokens=CHATCORE_NEW_TOKENS,
            temperature=0.0,
            top_k=50,
        )
        accuracies[name] = evaluate_chat_task(task, model, engine, tokenizer, runtime, options)
        baselines[name] = task.baseline
    return {**accuracies, "chatcore": chatcore(accuracies, baselines, PUBLISHED_CHATCORE_TASKS)}


@dataclass
class ChatLoopState(training.LoopState):
    chatcore: float | None = None
    progress: float = 0.0  # share of the mixture done; never decreases, drives the LR schedule


def main(stage_name: str, argv: list[str] | None = None) -> dict:
    stage = STAGES[stage_name]
    args = build_parser(stage).parse_args(argv)
    return training.run_training(stage.program, args, lambda *context: train(stage, *context))


def train(
    stage: Stage, args: argparse.Namespace, settings: TrainerSettings, runtime: Runtime, stop: StopRequest
) -> dict:
    source = training.open_source(settings, args)
    out_dir = settings.run_dir(args.run) / stage.name
    tokenizer = Tokenizer.load(settings.run_dir(args.run) / "tokenizer")
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=runtime.device)
    start_step = resume_step(args, out_dir)
    resuming = start_step is not None
    weights_from = (out_dir, start_step) if resuming else (source.folder, source.step)
    model, meta = checkpoint.load_model(*weights_from, runtime.device, runtime.dtype)
    recipe = training.Recipe(**meta["recipe"]).override(args)  # a resumed stage keeps its own
    micro_tokens = recipe.device_batch_size * recipe.max_seq_len * runtime.world_size
    if recipe.total_batch_size % micro_tokens or recipe.max_seq_len > model.config.sequence_len:
        raise SystemExit(
            f"batch {recipe.total_batch_size:,} tokens must be a multiple of device batch × seq len × "
            f"processes = {micro_tokens:,}, and seq len ≤ the model's {model.config.sequence_len:,}"
        )
    accumulation = recipe.total_batch_size // micro_tokens
    optimizer = training.build_optimizer(model, recipe, weight_decay=0.0, lr_frac=args.init_lr_frac)
    scaler = grad_scaler(runtime)
    train_model = compile_model(model, args.compile, runtime)

    mixture_path = Path(args.mixture) if args.mixture else default_mixture(stage.name)
    train_mixture = load_mixture(settings, mixture_path, "train", seed=args.seed)
    val_mixture = load_mixture(settings, mixture_path, "val", seed=args.seed)
    print0(f"source: {source.folder} step {source.step} | mixture {mixture_path}")
    print0(f"train: {train_mixture.describe()} conversations")
    print0(f"val: {val_mixture.describe()} conversations")
    print0(
        f"batch: {recipe.total_batch_size:,} tokens/step = {accumulation} × {micro_tokens:,} | "
        f"LR {args.init_lr_frac} × the source's (scale {recipe.lr_scale:.4f}) | runtime {runtime.device} × "
        f"{runtime.world_size}, {runtime.dtype}"
    )

    loader_state, loop = None, ChatLoopState()
    if resuming:
        loader_state = checkpoint.load_training_state(out_dir, start_step, optimizer, runtime, scaler)
        loop = ChatLoopState(**checkpoint.read_meta(out_dir, start_step)["loop_state"])
        print0(f"resumed from {checkpoint.step_dir(out_dir, start_step)}")
    elif args.load_optimizer and not training.warm_start_optimizer(
        optimizer, source.folder, source.step, runtime, 0.0
    ):
        print0("note: no optimizer state for this number of processes in the source: fresh optimizer")
    loader_args = {
        "batch_size": recipe.device_batch_size,
        "seq_len": recipe.max_seq_len,
        "pad": stage.pad,
        "rank": runtime.rank,
        "world_size": runtime.world_size,
        "device": runtime.device,
    }
    train_loader = ConversationLoader(tokenizer, train_mixture, state=loader_state, **loader_args)
    metrics = MetricsLog(out_dir / "metrics.jsonl", runtime, start_step)
    start_step = start_step or 0
    steps = args.num_iterations
    if steps is None:
        steps = eval_budget.epoch_steps(
            tokenizer, train_mixture, recipe.max_seq_len + 1, recipe.total_batch_size
        )
        print0(f"one pass over the mixture: about {steps:,} steps")
    eval_tokens, chatcore_limits = evaluation_budget(
        stage, args, steps, recipe.total_batch_size, runtime.device
    )
    # Read once: every ChatCORE evaluation uses the same problems.
    chat_tasks = (
        [CHAT_TASKS[name](settings) for name in PUBLISHED_CHATCORE_TASKS] if args.chatcore_every >= 0 else []
    )
    flops_per_token = model.estimate_flops()
    peak, _ = peak_flops(runtime)
    wandb_run = init_wandb(settings, f"{args.run}-{stage.name}", vars(args), runtime)
    bar = (
        progress_bar(total=100, unit="%", initial=round(100 * loop.progress)) if sys.stderr.isatty() else None
    )
    log = bar.write if bar is not None else print0

    def finished(step: int) -> bool:
        if args.num_iterations is not None:
            return step >= args.num_iterations
        return runtime.any(loop.progress >= 1.0)

    step_times: list[float] = []
    invocation_start, wall_before = time.time(), loop.wall_time
    step = start_step
    while True:
        last, stopping = finished(step), runtime.any(stop.requested)
        done_before_checkpoint = resuming and step == start_step
        if not done_before_checkpoint and eval_budget.due(args.eval_every, step, last, at_start=True):
            model.eval()
            val_loader = ConversationLoader(tokenizer, val_mixture, **loader_args)
            val_bpb = evaluate_bpb(train_model, val_loader, max(1, eval_tokens // micro_tokens), token_bytes)
            model.train()
            loop.record_eval(val_bpb)
            log(f"step {step} | val bpb {val_bpb:.4f}")
            metrics.write({"step": step, "val_bpb": val_bpb})
            wandb_run.log({"val/bpb": val_bpb}, step=step)
        if not done_before_checkpoint and eval_budget.due(args.chatcore_every, step, last):
            model.eval()  # the uncompiled model: prompts change shape all the time
            scores = evaluate_chatcore(
                model, tokenizer, chat_tasks, runtime, chatcore_limits, recipe.device_batch_size
            )
            model.train()
            loop.chatcore = scores["chatcore"]
            log(f"step {step} | " + " | ".join(f"{name} {value:.4f}" for name, value in scores.items()))
            metrics.write({"step": step, **scores})
            wandb_run.log(scores, step=step)
        if step > start_step and (last or stopping or (args.save_every > 0 and step % args.save_every == 0)):
            loop.wall_time = wall_before + time.time() - invocation_start
            meta = {
                "phase": stage.name,
                "args": vars(args),
                "source": {"folder": str(source.folder), "step": source.step},
                "val_bpb": loop.val_bpb,
                "loop_state": asdict(loop),
                "recipe": asdict(recipe),
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
            log(f"step {step} | checkpoint {saved}")
        if last or stopping:
            break

        runtime.synchronize()
        t0 = time.time()
        progress = step / args.num_iterations if args.num_iterations is not None else loop.progress
        lrm = lr_multiplier(progress, args)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * lrm
            if group["kind"] == "muon":
                group["momentum"] = muon_momentum(step)
        loss = runtime.mean(
            training.train_step(train_model, train_loader, optimizer, accumulation, scaler, runtime)
        )
        runtime.synchronize()
        dt = time.time() - t0
        step += 1
        loop.progress = max(loop.progress, runtime.mean(train_loader.progress))
        step_times.append(dt)
        loop.record_step(step - 1, dt)
        tok_per_s = recipe.total_batch_size / dt
        mfu = flops_per_token * tok_per_s / (peak * runtime.world_size)
        done = step / args.num_iterations if args.num_iterations is not None else loop.progress
        eta = format_duration((1 - done) / max(done, 1e-9) * (wall_before + time.time() - invocation_start))
        log(
            f"step {step} ({100 * done:.1f}%) | loss {loss:.4f} | lrm {lrm:.2f} | dt {dt:.2f}s | "
            f"tok/s {tok_per_s:,.0f} | mfu {100 * mfu:.1f}% | eta {eta}"
        )
        metrics.write(
            {
                "step": step,
                "loss": loss,
                "lrm": lrm,
                "dt": dt,
                "tok_per_s": tok_per_s,
                "mfu": mfu,
                "progress": done,
            }
        )
        wandb_run.log({"train/loss": loss, "train/lrm": lrm, "train/mfu": mfu}, step=step)
        if bar is not None:
            bar.n = min(100, round(100 * done))
            bar.refresh()

    if bar is not None:
        bar.close()
    wandb_run.finish()
    if stopping and not last:
        training.exit_stopped(runtime, step)
    tok_per_s = recipe.total_batch_size / median(step_times) if step_times else None
    summary = {
        "source": f"{source.folder.parent.name}/{source.folder.name} step {source.step}",
        "steps": step,
        "conversations": len(train_mixture),
        "epochs": round(loop.progress, 3),
        "total_batch_size": recipe.total_batch_size,
        "val_bpb": rounded(loop.val_bpb),
        "min_val_bpb": rounded(loop.min_val_bpb),
        "chatcore": rounded(loop.chatcore),
        "tok_per_s": round(tok_per_s) if tok_per_s else None,
        **summary_times(loop, wall_before + time.time() - invocation_start),
        **training.runtime_summary(runtime),
    }
    if runtime.is_master:
        write_section(settings, args.run, stage.program, summary, vars(args))
    print0(f"{stage.program} done: " + json.dumps(summary, ensure_ascii=False))
    return summary
