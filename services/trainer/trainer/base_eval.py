"""
Evaluate a base model: CORE (core_eval.py), bits per byte on the train and val shards, and greedy
samples from fixed prompts. Results go to the run's report (section base_eval) and, per task, to the
log; several processes split CORE's examples and the bpb batches.

    python -m trainer.base_eval --run demo                                   # all three, latest step
    python -m trainer.base_eval --run demo --eval core --max-per-task 100    # a quick CORE
    torchrun --standalone --nproc_per_node=8 -m trainer.base_eval -- --run demo
"""

import argparse
import time
from collections.abc import Callable

import torch

from trainer import checkpoint, core_eval, dataset, eval_budget, task_data
from trainer.base_train import PHASE, SAMPLE_PROMPTS
from trainer.common import (
    BATCH_SIZE,
    CHECKPOINT_STEP,
    EVAL_TOKENS,
    PER_TASK,
    add_run_flag,
    print0,
    print_banner,
)
from trainer.dataloader import PackingLoader
from trainer.engine import Engine
from trainer.gpt import GPT
from trainer.loss_eval import evaluate_bpb
from trainer.report import write_section
from trainer.runtime import Runtime, add_runtime_flags, setup_runtime, shutdown
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer

EVALS = ("core", "bpb", "sample")
# The reference's budgets (nanochat 92d63d4, scripts/base_eval.py): the defaults on CUDA.
REFERENCE_SPLIT_TOKENS = 40 * 2**19
REFERENCE_MAX_PER_TASK = -1

parser = argparse.ArgumentParser(description="CORE, bits per byte and samples of a base model.")
add_run_flag(parser)
parser.add_argument(
    "--step", type=CHECKPOINT_STEP, default=None, help="checkpoint step (default: the latest)"
)
parser.add_argument(
    "--eval", default="core,bpb,sample", help="comma-separated: core, bpb, sample (default: all)"
)
parser.add_argument(
    "--max-per-task",
    type=PER_TASK,
    default=None,
    help="CORE examples per task, after the seeded shuffle, -1: all (default: all on CUDA, sized to the "
    "model's training elsewhere)",
)
parser.add_argument(
    "--core-tasks",
    default="core.yaml",
    help="task list in the eval bundle; core_offline.yaml is used when the bundle lacks some data "
    "(default: core.yaml)",
)
parser.add_argument(
    "--split-tokens",
    type=EVAL_TOKENS,
    default=None,
    help="tokens per split for bpb (default: the reference's 21.0M on CUDA, sized to the model's training "
    "elsewhere)",
)
parser.add_argument(
    "--device-batch-size", type=BATCH_SIZE, default=32, help="sequences per bpb batch (default: 32)"
)
add_runtime_flags(parser)


def budget(
    flag: str,
    given: int | None,
    reference: int,
    trained: int | None,
    fit: Callable[[int], int],
    device: torch.device,
) -> int:
    """eval_budget.pick sized to the tokens the model trained on: `fit(trained)` (the reference's when its
    checkpoint does not say)."""
    if trained is None:
        why = "its checkpoint does not say how many tokens it trained on"
        return eval_budget.pick(flag, given, reference, reference, why, device)
    why = f"as many tokens as the model trained on ({trained:,})"
    return eval_budget.pick(flag, given, reference, fit(trained), why, device)


def core(
    model: GPT,
    tokenizer: Tokenizer,
    settings: TrainerSettings,
    runtime: Runtime,
    args: argparse.Namespace,
    trained: int | None,
) -> dict:
    """CORE of the model over the bundle's tasks (the offline kit's 20 when the real 22 are not there)."""
    bundle = task_data.eval_bundle_dir(settings)
    chosen = core_eval.choose_config(bundle, args.core_tasks, log=print0)
    tasks = len(core_eval.load_tasks(bundle, chosen))
    max_per_task = budget(
        "--max-per-task",
        args.max_per_task,
        REFERENCE_MAX_PER_TASK,
        trained,
        lambda tokens: eval_budget.core_examples(tokens, tasks),
        runtime.device,
    )
    started = time.time()
    results = core_eval.evaluate_core(model, tokenizer, bundle, runtime.device, chosen, max_per_task, print0)
    print0(f"CORE {results['core']:.4f} over {len(results['tasks'])} tasks ({time.time() - started:.0f}s)")
    return results


def bits_per_byte(
    model: GPT,
    tokenizer: Tokenizer,
    settings: TrainerSettings,
    runtime: Runtime,
    args: argparse.Namespace,
    trained: int | None,
) -> dict[str, float]:
    """bpb on the train and val splits (off CUDA, the two together read what the model trained on)."""
    split_tokens = budget(
        "--split-tokens",
        args.split_tokens,
        REFERENCE_SPLIT_TOKENS,
        trained,
        lambda tokens: max(1, tokens // 2),
        runtime.device,
    )
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=runtime.device)
    seq_len = model.config.sequence_len
    steps = max(1, split_tokens // (args.device_batch_size * seq_len * runtime.world_size))
    results = {}
    for split in ("train", "val"):
        loader = PackingLoader(
            tokenizer,
            dataset.list_shards(settings, split),
            args.device_batch_size,
            seq_len,
            runtime.rank,
            runtime.world_size,
            runtime.device,
        )
        results[split] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb {results[split]:.4f}")
    return results


def samples(model: GPT, tokenizer: Tokenizer) -> dict[str, list[str]]:
    """Greedy completions of the fixed prompts, and a few unconditioned samples at temperature 1."""
    engine = Engine(model, tokenizer)
    greedy = []
    for prompt in SAMPLE_PROMPTS:
        (completion,) = engine.complete(
            tokenizer.encode(prompt, prepend=tokenizer.bos_token_id), max_tokens=16, temperature=0
        )
        greedy.append(prompt + tokenizer.decode([t.id for t in completion]))
    free = [
        tokenizer.decode([t.id for t in row])
        for row in engine.complete([tokenizer.bos_token_id], num_samples=4, max_tokens=64, temperature=1.0)
    ]
    for text in [*greedy, *free]:
        print0(f"  sample | {text!r}")
    return {"greedy": greedy, "unconditioned": free}


def main(argv: list[str] | None = None) -> dict:
    args = parser.parse_args(argv)
    evals = {name.strip() for name in args.eval.split(",") if name.strip()}
    if not evals or evals - set(EVALS):
        parser.error(f"--eval takes a comma-separated subset of {', '.join(EVALS)}, not {args.eval!r}")
    runtime = setup_runtime(args.device, args.dtype)
    settings = TrainerSettings()
    print_banner("base_eval", args, settings)
    try:
        folder = settings.run_dir(args.run) / PHASE
        step = checkpoint.resolve_step(folder, args.step)
        model, meta = checkpoint.load_model(folder, step, runtime.device, runtime.dtype)
        model.eval()
        tokenizer = Tokenizer.load(settings.run_dir(args.run) / "tokenizer")
        print0(f"evaluating {checkpoint.step_dir(folder, step)} on {runtime.device} in {runtime.dtype}")
        started = time.time()
        summary: dict = {"step": step}
        trained = meta.get("tokens_seen")  # what off-CUDA budgets are sized to
        if "core" in evals:
            results = core(model, tokenizer, settings, runtime, args, trained)
            summary.update(
                core=round(results["core"], 4),
                core_tasks=results["config"],
                max_per_task=results["max_per_task"],
            )
            summary["core_per_task"] = {
                label: {"accuracy": round(r["accuracy"], 4), "centered": round(r["centered"], 4)}
                for label, r in results["tasks"].items()
            }
        if "bpb" in evals:
            bpb = bits_per_byte(model, tokenizer, settings, runtime, args, trained)
            summary.update(train_bpb=round(bpb["train"], 4), val_bpb=round(bpb["val"], 4))
        if "sample" in evals and runtime.is_master:
            summary["samples"] = samples(model, tokenizer)
        summary.update(wall_seconds=round(time.time() - started, 1), gpus=runtime.gpus)
        if runtime.is_master:
            write_section(settings, args.run, "base_eval", summary, vars(args))
        return summary
    finally:
        shutdown(runtime)


if __name__ == "__main__":
    main()
