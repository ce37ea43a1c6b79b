"""
Fine-tuning on conversations: the loop behind the supervised chat stages of both reference recipes.

- current (nanochat 92d63d4) sft, `trainer.chat_sft`: from the base model; SmolTalk + MMLU ×3 + GSM8K ×4
  (sft.yaml) in best-fit packed rows, padded rather than cut; the assistant's tokens learned; the base
  run's batch and raw matrix/embedding/unembedding LRs (without its batch factor; scalar LR 0.5), every
  LR × 0.8, linear warm-down over the last 50% to 0; Muon momentum 0.85 → 0.95 over 300 steps; the
  optimizer's momentum warm-started from the base checkpoint; ChatCORE measured as it trains.
- classic (nanochat 348fbb3) mid, `trainer.mid_train`: from the base model; mid.yaml (with SimpleSpelling
  and SpellingBee), packed and padded the same way but every token learned; its own LRs (CHAT_LRS) at
  1.0×, constant, then a linear decay to 0 over the last 20%; the same momentum ramp; a fresh optimizer.
- classic sft, `trainer.chat_sft --recipe classic`: from the mid model; a light mixture (sft_classic.yaml),
  one conversation a row padded to the longest of its batch, 32 conversations a step (4 a forward pass);
  the assistant's tokens learned; CHAT_LRS × 0.02 decaying linearly to 0 over len(mixture) // 32 steps;
  Muon momentum 0.95; a fresh optimizer; MMLU and ARC-Easy measured as it trains.

All three use no Muon weight decay and the optimizer settings of their reference version (GROUP_SETTINGS
in training.py), train one pass over their mixture by default, and checkpoint and resume exactly, as
base_train does. Batch sizes default to the source run's: the current SFT's, as the reference's; the
reference's mid has defaults of its own (2048 × 32 rows, 2^19 tokens), its base run's, which a pipeline
passes where the base run's differ. Flags override everything.
"""

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from statistics import median

import torch

from trainer import checkpoint, eval_budget, training, user_files
from trainer.chat_eval import chatcore
from trainer.chat_eval import evaluate_task as evaluate_chat_task
from trainer.common import (
    EVAL_TOKENS,
    EVERY_N_STEPS,
    FRACTION,
    PER_TASK,
    Bounded,
    add_run_flag,
    print0,
    progress_bar,
)
from trainer.conversation_loader import ConversationLoader
from trainer.engine import Engine
from trainer.loss_eval import evaluate_bpb
from trainer.mixture import DEFAULTS_DIR, load_mixture
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
from trainer.tasks import CHAT_TASKS, PUBLISHED_CHATCORE_TASKS, Task
from trainer.tokenizer import Tokenizer
from trainer.training import (
    CHAT_LRS,
    INHERITED_LRS,
    LR_NAMES,
    MetricsLog,
    Recipe,
    format_duration,
    grad_scaler,
    resume_step,
    rounded,
    summary_times,
)

RECIPES = ("current", "classic")


@dataclass(frozen=True)
class Stage:
    """A supervised chat stage as one reference version computes it. The fields named in FLAG_DEFAULTS
    are the defaults of the program's flags of the same name."""

    recipe: str  # "current" (92d63d4) or "classic" (348fbb3); also its optimizer's GROUP_SETTINGS
    name: str  # its folder under the run, and the report's stage name
    program: str  # its module and report section
    learn_all: bool  # every token learned (the classic mid), else the assistant's only
    one_per_row: bool  # one conversation a row (the classic SFT), else best-fit packed and padded
    inherit_lrs: bool  # the source run's INHERITED_LRS (the current SFT), else CHAT_LRS
    momentum_ramp: bool  # Muon momentum 0.85 → 0.95 over 300 steps, else setup_optimizer's 0.95
    chatcore_tasks: tuple[str, ...]  # what --chatcore-every measures
    source: str
    mixture: str  # a file beside mixture.py
    init_lr_frac: float
    warmdown_ratio: float
    load_optimizer: bool  # warm-start the momentum buffers from the source checkpoint
    device_batch_size: int | None  # None: the source run's
    examples_per_step: int | None  # conversations per optimizer step (one a row only)
    eval_every: int
    eval_tokens: int  # the reference's val tokens per evaluation: the default on CUDA
    chatcore_every: int
    chatcore_max_cat: int  # the reference's problems per choice task: the default on CUDA


FLAG_DEFAULTS = (
    "source", "mixture", "init_lr_frac", "warmdown_ratio", "load_optimizer", "device_batch_size",
    "examples_per_step", "eval_every", "chatcore_every",
)  # fmt: skip
# ChatCORE during SFT as the reference computes it (nanochat 92d63d4, scripts/chat_sft.py): 24 generative
# problems per task on CUDA, replies of up to 512 tokens.
REFERENCE_CHATCORE_MAX_SAMPLE = 24
CHATCORE_NEW_TOKENS = 512
STAGES = [
    Stage(
        "current", "sft", "chat_sft",
        learn_all=False, one_per_row=False, inherit_lrs=True, momentum_ramp=True,
        chatcore_tasks=tuple(PUBLISHED_CHATCORE_TASKS),
        source="base", mixture="sft.yaml", init_lr_frac=0.8, warmdown_ratio=0.5, load_optimizer=True,
        device_batch_size=None, examples_per_step=None, eval_every=200, eval_tokens=40 * 2**19,
        chatcore_every=200, chatcore_max_cat=-1,
    ),
    Stage(
        "classic", "mid", "mid_train",
        learn_all=True, one_per_row=False, inherit_lrs=False, momentum_ramp=True,
        chatcore_tasks=tuple(PUBLISHED_CHATCORE_TASKS),
        source="base", mixture="mid.yaml", init_lr_frac=1.0, warmdown_ratio=0.2, load_optimizer=False,
        device_batch_size=None, examples_per_step=None, eval_every=150, eval_tokens=20 * 2**19,
        chatcore_every=-1, chatcore_max_cat=-1,
    ),
    Stage(  # its val loss reads 100 batches of 4 conversations: counted at the reference's 2048-token crop
        "classic", "sft", "chat_sft",
        learn_all=False, one_per_row=True, inherit_lrs=False, momentum_ramp=False,
        chatcore_tasks=("MMLU", "ARC-Easy"),
        source="mid", mixture="sft_classic.yaml", init_lr_frac=0.02, warmdown_ratio=1.0, load_optimizer=False,
        device_batch_size=4, examples_per_step=32, eval_every=100, eval_tokens=100 * 4 * 2048,
        chatcore_every=200, chatcore_max_cat=1024,
    ),
]  # fmt: skip
DESCRIPTIONS = {
    "mid_train": "Midtrain a base model on conversations (the classic recipe).",
    "chat_sft": "Fine-tune a chat model: the current recipe from the base model, or the classic one from "
    "the mid model.",
}


def program_stages(program: str) -> list[Stage]:
    return [stage for stage in STAGES if stage.program == program]


def per_recipe(program: str, value_of: Callable[[Stage], object]) -> tuple[object, str]:
    """A flag's argparse default and how its help shows it: the value when the program's recipes agree
    on it, else None (filled in once --recipe is known) and each recipe's; None itself is the source
    run's."""

    def shown(value: object) -> str:
        return "the source run's" if value is None else str(value)

    values = {stage.recipe: value_of(stage) for stage in program_stages(program)}
    if len(set(values.values())) == 1:
        value = next(iter(values.values()))
        return value, shown(value)
    return None, ", ".join(f"{recipe} {shown(value)}" for recipe, value in values.items())


def stage_default(program: str, name: str) -> tuple[object, str]:
    return per_recipe(program, lambda stage: getattr(stage, name))


def stage_lr(name: str) -> Callable[[Stage], float | None]:
    """A stage's default for an LR flag: None where it inherits the source run's."""
    return lambda stage: None if stage.inherit_lrs and name in INHERITED_LRS else getattr(CHAT_LRS, name)


def build_parser(program: str) -> argparse.ArgumentParser:
    """mid_train's or chat_sft's flags; chat_sft's --recipe picks the defaults the others leave open."""
    parser = argparse.ArgumentParser(description=DESCRIPTIONS[program])
    add_run_flag(parser)
    if program == "chat_sft":
        parser.add_argument(
            "--recipe",
            choices=RECIPES,
            default="current",
            help="the reference version: current (92d63d4, from the base model) or classic (348fbb3, light "
            "SFT from the mid model) (default: current)",
        )
    default, shown = stage_default(program, "source")
    training.add_source_flags(parser, default, ("base", "mid", "sft"), shown)
    group = parser.add_argument_group("Data")
    group.add_argument(
        "--mixture",
        default=None,
        help="task mixture file, or an uploaded mixture's id (default: "
        f"{stage_default(program, 'mixture')[1]} beside mixture.py)",
    )
    if program == "chat_sft":
        group.add_argument(
            "--examples-per-step",
            type=Bounded(int, 1, 65536),
            default=None,
            help="conversations per optimizer step when they go one a row (default: classic 32; the current "
            "recipe's batch is --total-batch-size tokens)",
        )
    lr_defaults = {name: per_recipe(program, stage_lr(name)) for name in LR_NAMES}
    group = training.add_lr_flags(
        parser, {**lr_defaults, "init_lr_frac": stage_default(program, "init_lr_frac")}
    )
    group.add_argument(
        "--warmup-ratio", type=FRACTION, default=0.0, help="share of the run in LR warm-up (default: 0)"
    )
    default, shown = stage_default(program, "warmdown_ratio")
    group.add_argument(
        "--warmdown-ratio",
        type=FRACTION,
        default=default,
        help=f"share of the run in linear warm-down (default: {shown})",
    )
    group.add_argument(
        "--final-lr-frac", type=FRACTION, default=0.0, help="LR at the end, × peak (default: 0)"
    )
    default, shown = stage_default(program, "load_optimizer")
    group.add_argument(
        "--load-optimizer",
        action=argparse.BooleanOptionalAction,
        default=default,
        help=f"start from the source checkpoint's momentum buffers (default: {shown})",
    )
    add_training_flags(parser, inherited=True)
    for name in ("device_batch_size", "eval_every"):
        set_default(parser, name, *stage_default(program, name))
    set_default(parser, "save_every", 500, "500")
    group = parser.add_argument_group("Chat evaluation during training")
    shown = stage_default(program, "eval_tokens")[1]
    group.add_argument(
        "--eval-tokens",
        type=EVAL_TOKENS,
        default=None,
        help=f"val tokens per bpb evaluation (default: the reference's on CUDA, {shown}; sized to the run "
        "elsewhere)",
    )
    default, shown = stage_default(program, "chatcore_every")
    tasks = "; ".join(
        f"{stage.recipe}: {', '.join(stage.chatcore_tasks)}" for stage in program_stages(program)
    )
    group.add_argument(
        "--chatcore-every",
        type=EVERY_N_STEPS,
        default=default,
        help=f"steps between evaluations of the chat tasks ({tasks}) and one at the end, 0: only at the end, "
        f"-1: off (default: {shown})",
    )
    shown = stage_default(program, "chatcore_max_cat")[1]
    group.add_argument(
        "--chatcore-max-cat",
        type=PER_TASK,
        default=None,
        help=f"problems per choice task, -1: all (default: the reference's on CUDA, {shown}; sized to the "
        "run elsewhere)",
    )
    group.add_argument(
        "--chatcore-max-sample",
        type=PER_TASK,
        default=None,
        help=f"problems per generative task, -1: all (default: {REFERENCE_CHATCORE_MAX_SAMPLE} on CUDA, "
        "sized to the run elsewhere)",
    )
    return parser


def set_default(parser: argparse.ArgumentParser, name: str, default: object, shown: str) -> None:
    """A shared training flag's default for this program, and its help to match."""
    parser.set_defaults(**{name: default})
    (action,) = [action for action in parser._actions if action.dest == name]
    action.help = f"{action.help.rpartition(' (default: ')[0]} (default: {shown})"


def resolve_stage(program: str, args: argparse.Namespace) -> Stage:
    """The stage of args.recipe, its defaults written into the flags left unset."""
    (stage,) = [s for s in program_stages(program) if s.recipe == getattr(args, "recipe", s.recipe)]
    for name in FLAG_DEFAULTS:
        if getattr(args, name, None) is None:
            value = getattr(stage, name)
            setattr(args, name, str(DEFAULTS_DIR / value) if name == "mixture" else value)
    if stage.one_per_row and args.total_batch_size is not None:
        raise SystemExit("--total-batch-size: this recipe's SFT counts its batch in --examples-per-step")
    if not stage.one_per_row and args.examples_per_step is not None:
        raise SystemExit("--examples-per-step: this stage's batch is --total-batch-size tokens")
    return stage


def stage_recipe(stage: Stage, source: Recipe, args: argparse.Namespace) -> Recipe:
    """The batch and LRs a stage trains with: the source run's batch; the source run's raw INHERITED_LRS
    (the current SFT) or CHAT_LRS; never a batch factor (the reference's chat stages have none); flags
    override each."""
    lrs = {}
    for name in LR_NAMES:
        own = stage_lr(name)(stage)
        lrs[name] = getattr(source, name) if own is None else own
    batch = {"max_seq_len": source.max_seq_len, "total_batch_size": source.total_batch_size}
    return Recipe(**batch, device_batch_size=source.device_batch_size, lr_scale=1.0, **lrs).override(args)


def lr_multiplier(progress: float, args: argparse.Namespace) -> float:
    """Warm-up, constant, linear warm-down, as a function of the share of the run done (0 → 1)."""
    if progress < args.warmup_ratio:
        return (progress + 1e-8) / args.warmup_ratio
    if progress <= 1.0 - args.warmdown_ratio:
        return 1.0
    decay = (progress - (1.0 - args.warmdown_ratio)) / args.warmdown_ratio
    return (1 - decay) + decay * args.final_lr_frac


def muon_momentum(step: int) -> float:
    """0.85 → 0.95 over the first 300 steps (the reference's mid and current SFT)."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95


def apply_schedules(
    stage: Stage, optimizer: MuonAdamW, step: int, progress: float, args: argparse.Namespace
) -> float:
    """Set every group's LR (and Muon's momentum, where the stage ramps it) for `step`; returns the LR
    multiplier."""
    lrm = lr_multiplier(progress, args)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lrm
        if group["kind"] == "muon" and stage.momentum_ramp:
            group["momentum"] = muon_momentum(step)
    return lrm


def evaluation_budget(
    stage: Stage, args: argparse.Namespace, steps: int, batch_tokens: int, device: torch.device
) -> tuple[int | None, tuple[int, int] | None]:
    """Val tokens per bpb evaluation and the chat tasks' (multiple-choice, generative) problems per task
    (None: that evaluation is off): as given, the reference's on CUDA, else sized to this run
    (eval_budget.py). Printed with the cadences."""
    print0(
        f"evaluation: val bpb {eval_budget.cadence(args.eval_every, steps, at_start=True)} | "
        f"chat tasks {eval_budget.cadence(args.chatcore_every, steps)}"
    )
    eval_tokens = eval_budget.val_tokens(
        args.eval_every, args.eval_tokens, stage.eval_tokens, steps, batch_tokens, device
    )
    if args.chatcore_every < 0:
        return eval_tokens, None
    tokens = eval_budget.tokens_per_evaluation(args.chatcore_every, steps, batch_tokens)
    tasks = len(stage.chatcore_tasks)
    choice, generative = eval_budget.chatcore_problems(tokens, tasks, CHATCORE_NEW_TOKENS)
    why = f"the {tokens:,} tokens trained per evaluation over {tasks} tasks"
    max_cat = eval_budget.pick(
        "--chatcore-max-cat",
        args.chatcore_max_cat,
        stage.chatcore_max_cat,
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
    model,
    tokenizer: Tokenizer,
    tasks: list[Task],
    runtime: Runtime,
    limits: tuple[int, int],
    batch_size: int,
    stop: StopRequest | None = None,
) -> dict[str, float]:
    """The chat tasks on their first problems (greedy), as the reference does during SFT; ChatCORE too
    when they are its five. `limits`: problems per multiple-choice task and per generative task (-1: all).
    A stop request ends it (EvalStopped)."""
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
        accuracies[name] = evaluate_chat_task(task, model, engine, tokenizer, runtime, options, stop)
        baselines[name] = task.baseline
    score = chatcore(accuracies, baselines, PUBLISHED_CHATCORE_TASKS)
    return accuracies if score is None else {**accuracies, "chatcore": score}


@dataclass
class ChatLoopState(training.LoopState):
    chatcore: float | None = None
    progress: float = 0.0  # share of the mixture done; never decreases, drives the LR schedule


def main(program: str, argv: list[str] | None = None) -> dict:
    args = build_parser(program).parse_args(argv)
    stage = resolve_stage(program, args)
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
    # A resumed stage keeps the recipe it started with.
    recipe = Recipe(**meta["recipe"]).override(args) if resuming else stage_recipe(stage, source.recipe, args)
    rows_per_pass = recipe.device_batch_size * runtime.world_size
    if stage.one_per_row:
        micro_batch, per_step, unit = rows_per_pass, args.examples_per_step, "conversations"
    else:
        micro_batch, per_step, unit = rows_per_pass * recipe.max_seq_len, recipe.total_batch_size, "tokens"
    if per_step % micro_batch or recipe.max_seq_len > model.config.sequence_len:
        raise SystemExit(
            f"batch {per_step:,} {unit} must be a multiple of {micro_batch:,} per forward pass of every "
            f"process, and seq len ≤ the model's {model.config.sequence_len:,}"
        )
    accumulation = per_step // micro_batch
    optimizer = training.build_optimizer(
        model, recipe.learning_rates(), weight_decay=0.0, lr_frac=args.init_lr_frac, version=stage.recipe
    )
    scaler = grad_scaler(runtime)
    if stage.one_per_row and args.compile:
        print0("note: rows change length every step, so this stage runs uncompiled (as the reference's)")
    train_model = compile_model(model, False if stage.one_per_row else args.compile, runtime)

    try:
        mixture_path = user_files.mixture_path(settings, args.mixture)
    except user_files.UnusableFile as error:
        raise SystemExit(f"--mixture: {error}") from error
    train_mixture = load_mixture(settings, mixture_path, "train", seed=args.seed)
    val_mixture = load_mixture(settings, mixture_path, "val", seed=args.seed)
    if stage.one_per_row and args.num_iterations is None:  # the reference's step count
        args.num_iterations = max(1, len(train_mixture) // args.examples_per_step)
    print0(
        f"{stage.recipe} recipe, {stage.name} | source: {source.folder} step {source.step} | "
        f"mixture {mixture_path}"
    )
    print0(f"train: {train_mixture.describe()} conversations")
    print0(f"val: {val_mixture.describe()} conversations")
    print0(
        f"batch: {per_step:,} {unit}/step = {accumulation} × {micro_batch:,} | learned: "
        f"{'every token' if stage.learn_all else 'the assistant'} | LRs {args.init_lr_frac} × "
        f"(matrix {recipe.matrix_lr}, embedding {recipe.embedding_lr}, unembedding {recipe.unembedding_lr}, "
        f"scalar {recipe.scalar_lr}) | runtime {runtime.device} × {runtime.world_size}, {runtime.dtype}"
    )

    loader_state, loop = None, ChatLoopState()
    if resuming:
        loader_state = checkpoint.load_training_state(out_dir, start_step, optimizer, runtime, scaler)
        loop = ChatLoopState(**checkpoint.read_meta(out_dir, start_step)["loop_state"])
        print0(f"resumed from {checkpoint.step_dir(out_dir, start_step)}")
    elif args.load_optimizer and not training.warm_start_optimizer(
        optimizer, source.folder, source.step, runtime
    ):
        print0("note: no optimizer state for this number of processes in the source: fresh optimizer")
    loader_args = {
        "batch_size": recipe.device_batch_size,
        "seq_len": recipe.max_seq_len,
        "learn_all": stage.learn_all,
        "one_per_row": stage.one_per_row,
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
    # Tokens a step trains on (for one conversation a row, at most: rows are padded to the longest).
    batch_tokens = per_step if unit == "tokens" else per_step * recipe.max_seq_len
    eval_tokens, chatcore_limits = evaluation_budget(stage, args, steps, batch_tokens, runtime.device)
    # Read once: every evaluation uses the same problems.
    chat_tasks = (
        [CHAT_TASKS[name](settings) for name in stage.chatcore_tasks] if args.chatcore_every >= 0 else []
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
        done_before_checkpoint = resuming and step == start_step and not loop.evals_pending
        with training.evaluations(model, loop):
            if not done_before_checkpoint and eval_budget.due(args.eval_every, step, last, at_start=True):
                model.eval()
                val_loader = ConversationLoader(tokenizer, val_mixture, **loader_args)
                eval_steps = max(1, eval_tokens // (rows_per_pass * recipe.max_seq_len))
                val_bpb = evaluate_bpb(train_model, val_loader, eval_steps, token_bytes, stop)
                model.train()
                loop.record_eval(val_bpb)
                log(f"step {step} | val bpb {val_bpb:.4f}")
                metrics.write({"step": step, "val_bpb": val_bpb})
                wandb_run.log({"val/bpb": val_bpb}, step=step)
            if not done_before_checkpoint and eval_budget.due(args.chatcore_every, step, last):
                model.eval()  # the uncompiled model: prompts change shape all the time
                scores = evaluate_chatcore(
                    model, tokenizer, chat_tasks, runtime, chatcore_limits, recipe.device_batch_size, stop
                )
                model.train()
                loop.chatcore = scores.get("chatcore")
                log(f"step {step} | " + " | ".join(f"{name} {value:.4f}" for name, value in scores.items()))
                metrics.write({"step": step, **scores})
                wandb_run.log(scores, step=step)
        stopping = stopping or loop.evals_pending
        if step > start_step and (last or stopping or (args.save_every > 0 and step % args.save_every == 0)):
            loop.wall_time = wall_before + time.time() - invocation_start
            meta = {
                "phase": stage.name,
                "recipe_version": stage.recipe,
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
        lrm = apply_schedules(stage, optimizer, step, progress, args)
        loss = runtime.mean(
            training.train_step(train_model, train_loader, optimizer, accumulation, scaler, runtime)
        )
        training.stop_if_diverged(loss, step + 1)
        runtime.synchronize()
        dt = time.time() - t0
        step += 1
        loop.progress = max(loop.progress, runtime.mean(train_loader.progress))
        step_times.append(dt)
        loop.record_step(step - 1, dt)
        tok_per_s = per_step / dt if unit == "tokens" else None
        mfu = flops_per_token * tok_per_s / (peak * runtime.world_size) if tok_per_s else None
        done = step / args.num_iterations if args.num_iterations is not None else loop.progress
        eta = format_duration((1 - done) / max(done, 1e-9) * (wall_before + time.time() - invocation_start))
        speed = (
            f"tok/s {tok_per_s:,.0f} | mfu {100 * mfu:.1f}%" if tok_per_s else f"rows/s {per_step / dt:,.1f}"
        )
        log(
            f"step {step} ({100 * done:.1f}%) | loss {loss:.4f} | lrm {lrm:.2f} | dt {dt:.2f}s | {speed} | "
            f"eta {eta}"
        )
        record = {"step": step, "loss": loss, "lrm": lrm, "dt": dt, "progress": done}
        metrics.write({**record, **({"tok_per_s": tok_per_s, "mfu": mfu} if tok_per_s else {})})
        wandb_run.log(
            {"train/loss": loss, "train/lrm": lrm, **({"train/mfu": mfu} if mfu else {})}, step=step
        )
        if bar is not None:
            bar.n = min(100, round(100 * done))
            bar.refresh()

    if bar is not None:
        bar.close()
    wandb_run.finish()
    if stopping and (not last or loop.evals_pending):
        training.exit_stopped(runtime, step)
    tok_per_s = per_step / median(step_times) if step_times and unit == "tokens" else None
    summary = {
        "recipe": stage.recipe,
        "source": f"{source.folder.parent.name}/{source.folder.name} step {source.step}",
        "steps": step,
        "conversations": len(train_mixture),
        "epochs": round(loop.progress, 3),
        "total_batch_size" if unit == "tokens" else "examples_per_step": per_step,
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
