"""
Evaluate a chat model (the mid, sft or rl stage of a run) on the chat tasks of tasks.py:

- categorical (ARC-Easy, ARC-Challenge, MMLU): batched, the logits of the answer letters only are
  compared at the position of the reply;
- generative (GSM8K, HumanEval, SpellingBee): sampled with the engine (calculator tool on), then graded;
  a problem passes when any of --num-samples replies does (pass@k; greedy pass@1 by default).

ChatCORE is the mean centred accuracy (acc − baseline)/(1 − baseline) over ARC-E, ARC-C, MMLU, GSM8K and
HumanEval, as nanochat's published report cards compute it; `chatcore_with_spelling` adds SpellingBee
(as nanochat's versions with that task did). Results go to the run's report (section chat_eval_<stage>),
with the sandbox's containment layers when HumanEval ran (a missing one: every program was refused).

    python -m trainer.chat_eval --run demo -i sft                       # every task
    python -m trainer.chat_eval --run demo -i sft -a "ARC-Easy|GSM8K" --max-problems 100
    torchrun --standalone --nproc_per_node=8 -m trainer.chat_eval -- --run demo -i sft
"""

import argparse
import time

import torch
import torch.distributed as dist

from trainer import checkpoint
from trainer.chat_format import render_for_completion
from trainer.common import (
    BATCH_SIZE,
    CHECKPOINT_STEP,
    NEW_TOKENS,
    SAMPLES,
    TEMPERATURE,
    TOP_K,
    Bounded,
    add_run_flag,
    print0,
    print_banner,
    progress_bar,
)
from trainer.engine import Engine
from trainer.execution import containment
from trainer.gpt import GPT
from trainer.report import write_section
from trainer.runtime import (
    Runtime,
    StopRequest,
    add_runtime_flags,
    end_if_stopped,
    setup_runtime,
    shutdown,
    until_stopped,
)
from trainer.settings import TrainerSettings
from trainer.tasks import CHAT_TASKS, PUBLISHED_CHATCORE_TASKS, Task
from trainer.tokenizer import Tokenizer

STAGES = ("mid", "sft", "rl")

parser = argparse.ArgumentParser(
    description="Evaluate a chat model on ARC, MMLU, GSM8K, HumanEval, SpellingBee."
)
add_run_flag(parser)
parser.add_argument("-i", "--source", choices=STAGES, required=True, help="which stage's model")
parser.add_argument(
    "--step", type=CHECKPOINT_STEP, default=None, help="checkpoint step (default: the latest)"
)
parser.add_argument(
    "-a", "--task-name", default=None, help=f"tasks separated by '|' (default: all of {'|'.join(CHAT_TASKS)})"
)
parser.add_argument(
    "-x",
    "--max-problems",
    type=Bounded(int, 1, 1_000_000),
    default=None,
    help="first N problems per task (default: all)",
)
parser.add_argument(
    "-b", "--batch-size", type=BATCH_SIZE, default=8, help="problems per categorical batch (default: 8)"
)
parser.add_argument(
    "-n", "--num-samples", type=SAMPLES, default=1, help="replies per generative problem (default: 1)"
)
parser.add_argument(
    "-m", "--max-new-tokens", type=NEW_TOKENS, default=512, help="tokens per reply (default: 512)"
)
parser.add_argument(
    "-t", "--temperature", type=TEMPERATURE, default=0.0, help="sampling temperature (default: 0)"
)
parser.add_argument(
    "-k", "--top-k", type=TOP_K, default=50, help="sample from the k likeliest tokens (default: 50)"
)
add_runtime_flags(parser)


def letter_token(tokenizer: Tokenizer, letter: str) -> int:
    ids = tokenizer.encode(letter)
    if len(ids) != 1:
        raise ValueError(f"answer letter {letter!r} is {len(ids)} tokens in this tokenizer; it must be one")
    return ids[0]


@torch.no_grad()
def categorical(
    task: Task,
    model: GPT,
    tokenizer: Tokenizer,
    runtime: Runtime,
    problems: int,
    batch: int,
    stop: StopRequest | None = None,
) -> tuple[int, int]:
    """(passed, total) on this rank: the likeliest answer letter at the reply position is graded."""
    passed = total = 0
    starts = range(runtime.rank * batch, problems, runtime.world_size * batch)
    for start in until_stopped(progress_bar(starts, desc=task.name, unit="batch"), stop):
        conversations = [task[i] for i in range(start, min(start + batch, problems))]
        prompts = [render_for_completion(tokenizer, c["messages"]) for c in conversations]
        width = max(len(p) for p in prompts)
        padded = [p + [tokenizer.bos_token_id] * (width - len(p)) for p in prompts]
        logits = model(torch.tensor(padded, device=runtime.device))
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts, strict=True)):
            letters = conversation["letters"]
            choice = logits[row, len(prompt) - 1, [letter_token(tokenizer, letter) for letter in letters]]
            passed += task.evaluate(conversation, letters[int(choice.argmax())])
            total += 1
    return passed, total


def generative(
    task: Task,
    engine: Engine,
    tokenizer: Tokenizer,
    runtime: Runtime,
    problems: int,
    args,
    stop: StopRequest | None = None,
) -> tuple[int, int]:
    """(passed, total) on this rank: a problem passes when any of its sampled replies is graded right."""
    passed = total = 0
    indices = range(runtime.rank, problems, runtime.world_size)
    for i in until_stopped(progress_bar(indices, desc=task.name, unit="problem"), stop):
        conversation = task[i]
        replies = engine.complete(
            render_for_completion(tokenizer, conversation["messages"]),
            num_samples=args.num_samples,
            max_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=i,
        )
        passed += any(
            task.evaluate(conversation, tokenizer.decode([t.id for t in reply])) for reply in replies
        )
        total += 1
    return passed, total


def evaluate_task(
    task: Task,
    model: GPT,
    engine: Engine,
    tokenizer: Tokenizer,
    runtime: Runtime,
    args,
    stop: StopRequest | None = None,
) -> float:
    """The task's accuracy; a stop request ends it (EvalStopped)."""
    problems = len(task) if args.max_problems is None else min(len(task), args.max_problems)
    if task.eval_type == "categorical":
        passed, total = categorical(task, model, tokenizer, runtime, problems, args.batch_size, stop)
    else:
        passed, total = generative(task, engine, tokenizer, runtime, problems, args, stop)
    end_if_stopped(stop, runtime.device)
    if runtime.distributed:
        counts = torch.tensor([passed, total], dtype=torch.long, device=runtime.device)
        dist.all_reduce(counts)
        passed, total = counts.tolist()
    return passed / total


def chatcore(accuracies: dict[str, float], baselines: dict[str, float], names: list[str]) -> float | None:
    """Mean centred accuracy over `names`, or None unless every one of them was evaluated."""
    if not all(name in accuracies for name in names):
        return None
    return sum((accuracies[n] - baselines[n]) / (1 - baselines[n]) for n in names) / len(names)


def main(argv: list[str] | None = None) -> dict:
    args = parser.parse_args(argv)
    names = list(CHAT_TASKS) if args.task_name is None else [n.strip() for n in args.task_name.split("|")]
    unknown = [n for n in names if n not in CHAT_TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(CHAT_TASKS)}")
    runtime = setup_runtime(args.device, args.dtype)
    settings = TrainerSettings()
    print_banner("chat_eval", args, settings)
    try:
        folder = settings.run_dir(args.run) / args.source
        step = checkpoint.resolve_step(folder, args.step)
        model, _ = checkpoint.load_model(folder, step, runtime.device, runtime.dtype)
        model.eval()
        tokenizer = Tokenizer.load(settings.run_dir(args.run) / "tokenizer")
        engine = Engine(model, tokenizer)
        accuracies, baselines, started_all = {}, {}, time.time()
        for name in names:
            task = CHAT_TASKS[name](settings)
            started = time.time()
            accuracies[name], baselines[name] = (
                evaluate_task(task, model, engine, tokenizer, runtime, args),
                task.baseline,
            )
            print0(f"{name}: {100 * accuracies[name]:.2f}% ({time.time() - started:.0f}s)")
        summary = {
            "source": args.source,
            "step": step,
            **{name: round(acc, 4) for name, acc in accuracies.items()},
        }
        score = chatcore(accuracies, baselines, PUBLISHED_CHATCORE_TASKS)
        with_spelling = chatcore(accuracies, baselines, [*PUBLISHED_CHATCORE_TASKS, "SpellingBee"])
        if score is not None:
            summary["chatcore"] = round(score, 4)
            print0(f"ChatCORE {score:.4f}")
        if with_spelling is not None:
            summary["chatcore_with_spelling"] = round(with_spelling, 4)
        if "HumanEval" in accuracies:  # the layers its programs ran under; one missing: each was refused
            summary["sandbox"] = containment()
        if args.max_problems is not None:
            summary["max_problems"] = args.max_problems
        summary.update(wall_seconds=round(time.time() - started_all, 1), gpus=runtime.gpus)
        if runtime.is_master:
            write_section(settings, args.run, f"chat_eval_{args.source}", summary, vars(args))
        return summary
    finally:
        shutdown(runtime)


if __name__ == "__main__":
    main()
