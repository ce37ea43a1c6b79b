"""
CORE (the DCLM paper's metric, https://arxiv.org/abs/2406.11794), computed as nanochat reports it, so
our numbers compare with published ones: 22 in-context-learning tasks of three kinds, each scored by
accuracy, centred on its random baseline, and averaged.

- multiple_choice: one prompt per choice (shared context, different continuation); the choice whose
  continuation tokens have the lowest mean loss wins;
- schema: one prompt per context option (different context, shared continuation); same rule;
- language_modeling: correct when greedy decoding reproduces the continuation exactly.

Few-shot examples precede each prompt, separated by blank lines. Which examples are seen is fixed:
each task's rows are shuffled with Random(1337) before --max-per-task keeps the first N, and example
idx gets the few-shot rows Random(1234 + idx).sample(every other index, k). Centred accuracy is
(acc − b)/(1 − b) with b the random baseline of eval_meta_data.csv (given there in percent).

A prompt longer than the model's context is scored whole, never cropped, as nanochat scores its own GPT:
the rotary table covers 10× the context (and grows past it, where nanochat's would stop: gpt.py), and
the full-context layers see the last context-length tokens, as in training.
"""

import csv
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from trainer.common import progress_bar
from trainer.runtime import StopRequest, end_if_stopped, until_stopped
from trainer.tokenizer import Tokenizer

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
# A CORE model: token ids (B, T) → logits (B, T, vocab).
Model = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class CoreTask:
    label: str
    task_type: str
    dataset_uri: str  # under eval_bundle/eval_data/
    num_fewshot: int
    continuation_delimiter: str
    random_baseline: float  # as a fraction


def load_tasks(bundle: Path, config: str = "core.yaml") -> list[CoreTask]:
    """The tasks a bundle config lists, with their random baselines from eval_meta_data.csv."""
    with open(bundle / "eval_meta_data.csv", encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) / 100 for row in csv.DictReader(f)}
    tasks = []
    for entry in yaml.safe_load((bundle / config).read_text(encoding="utf-8"))["icl_tasks"]:
        assert entry["icl_task_type"] in TASK_TYPES, (
            f"{entry['label']}: unknown type {entry['icl_task_type']}"
        )
        tasks.append(
            CoreTask(
                label=entry["label"],
                task_type=entry["icl_task_type"],
                dataset_uri=entry["dataset_uri"],
                num_fewshot=entry["num_fewshot"][0],
                continuation_delimiter=entry.get("continuation_delimiter", " "),
                random_baseline=baselines[entry["label"]],
            )
        )
    return tasks


def load_examples(bundle: Path, task: CoreTask, max_per_task: int = -1) -> list[dict[str, Any]]:
    """The task's rows, shuffled with Random(1337); the first max_per_task of them when > 0."""
    with open(bundle / "eval_data" / task.dataset_uri, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    random.Random(1337).shuffle(rows)
    return rows[:max_per_task] if max_per_task > 0 else rows


def fewshot_indices(idx: int, num_examples: int, k: int) -> list[int]:
    """The k few-shot examples of example idx: a seeded sample of every other index (fewer when a small
    --max-per-task leaves fewer than k others; the reference fails there)."""
    k = min(k, num_examples - 1)
    if k <= 0:
        return []
    return random.Random(1234 + idx).sample([i for i in range(num_examples) if i != idx], k)


# -- prompts ------------------------------------------------------------------------------


def render_prompts(task: CoreTask, item: dict, fewshot: list[dict]) -> list[str]:
    """The prompts scored for one example: one per choice (multiple_choice), one per context option
    (schema), or [without, with] the continuation (language_modeling)."""
    delimiter = task.continuation_delimiter
    if task.task_type == "multiple_choice":
        shots = "".join(f"{ex['query']}{delimiter}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot)
        return [f"{shots}{item['query']}{delimiter}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        shots = "".join(
            f"{ex['context_options'][ex['gold']]}{delimiter}{ex['continuation']}\n\n" for ex in fewshot
        )
        return [f"{shots}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]
    # Contexts are trimmed: some datasets store trailing whitespace, which would merge into the
    # continuation's first token and leave no clean token boundary.
    shots = "".join(f"{ex['context'].strip()}{delimiter}{ex['continuation']}\n\n" for ex in fewshot)
    without = f"{shots}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


def common_length(sequences: list[list[int]], from_end: bool = False) -> int:
    """Length of the prefix (or suffix) that all sequences share."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        position = -1 - i if from_end else i
        if any(s[position] != sequences[0][position] for s in sequences):
            return i
    return shortest


def tokenize_prompts(
    tokenizer: Tokenizer, task_type: str, prompts: list[str]
) -> tuple[list[list[int]], list[int], list[int]]:
    """(token rows, start, end): the scored continuation of row i is tokens[i][start[i]:end[i]]."""
    rows = tokenizer.encode_batch(prompts, prepend=tokenizer.bos_token_id)
    ends = [len(row) for row in rows]
    if task_type == "multiple_choice":  # shared context: continuations start where the rows diverge
        return rows, [common_length(rows)] * len(rows), ends
    if task_type == "schema":  # shared continuation: the common suffix
        suffix = common_length(rows, from_end=True)
        return rows, [end - suffix for end in ends], ends
    without, with_continuation = rows
    assert with_continuation[: len(without)] == without, "the prompt without its continuation is not a prefix"
    return [with_continuation], [len(without)], [len(with_continuation)]


# -- scoring ------------------------------------------------------------------------------


@torch.no_grad()
def score_example(
    model: Model,
    tokenizer: Tokenizer,
    task: CoreTask,
    examples: list[dict],
    idx: int,
    device: torch.device,
) -> bool:
    """Whether the model gets example idx right."""
    item = examples[idx]
    fewshot = [examples[i] for i in fewshot_indices(idx, len(examples), task.num_fewshot)]
    rows, starts, ends = tokenize_prompts(tokenizer, task.task_type, render_prompts(task, item, fewshot))
    width = max(len(row) for row in rows)
    padded = [row + [tokenizer.bos_token_id] * (width - len(row)) for row in rows]  # padding is never scored
    input_ids = torch.tensor(padded, dtype=torch.long, device=device)
    logits = model(input_ids).float()
    if task.task_type == "language_modeling":
        predicted = logits[0, starts[0] - 1 : ends[0] - 1].argmax(dim=-1)
        return bool(torch.equal(predicted, input_ids[0, starts[0] : ends[0]]))
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    mean_losses = [
        losses[i, s - 1 : e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends, strict=True))
    ]
    return mean_losses.index(min(mean_losses)) == item["gold"]


def evaluate_task(
    model: Model,
    tokenizer: Tokenizer,
    task: CoreTask,
    examples: list[dict],
    device: torch.device,
    stop: StopRequest | None = None,
) -> float:
    """Accuracy over the examples; with torch.distributed each rank scores every world_size-th one. A stop
    request ends it (EvalStopped)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    correct = torch.zeros(len(examples), dtype=torch.float32, device=device)
    indices = range(rank, len(examples), world_size)
    for idx in until_stopped(progress_bar(indices, desc=task.label, unit="example", leave=False), stop):
        correct[idx] = float(score_example(model, tokenizer, task, examples, idx, device))
    end_if_stopped(stop, device)
    if distributed:
        dist.all_reduce(correct)
    return correct.mean().item()


def centered(accuracy: float, random_baseline: float) -> float:
    """0 at the random baseline, 1 at perfect accuracy."""
    return (accuracy - random_baseline) / (1 - random_baseline)


def evaluate_core(
    model: Model,
    tokenizer: Tokenizer,
    bundle: Path,
    device: torch.device,
    config: str = "core.yaml",
    max_per_task: int = -1,
    log: Callable[[str], None] = print,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """CORE over the config's tasks: {'core', 'tasks': {label: {accuracy, centered, ...}}}; a stop request
    ends it (EvalStopped)."""
    results = {}
    for task in load_tasks(bundle, config):
        examples = load_examples(bundle, task, max_per_task)
        accuracy = evaluate_task(model, tokenizer, task, examples, device, stop)
        results[task.label] = {
            "accuracy": accuracy,
            "centered": centered(accuracy, task.random_baseline),
            "random_baseline": task.random_baseline,
            "examples": len(examples),
            "shots": task.num_fewshot,
            "type": task.task_type,
        }
        log(f"  {task.label:<34} acc {accuracy:.4f} | centred {results[task.label]['centered']:+.4f}")
    core = sum(r["centered"] for r in results.values()) / len(results)
    return {"core": core, "config": config, "max_per_task": max_per_task, "tasks": results}


def missing_task_files(bundle: Path, config: str) -> list[str]:
    """Data files a config names that the bundle lacks (the offline kit has 20 of the 22)."""
    return [
        t.dataset_uri
        for t in load_tasks(bundle, config)
        if not (bundle / "eval_data" / t.dataset_uri).exists()
    ]


def choose_config(bundle: Path, requested: str, log: Callable[[str], None] = print) -> str:
    """The requested task config, or core_offline.yaml when the bundle lacks some of its data (said)."""
    missing = missing_task_files(bundle, requested)
    if not missing:
        return requested
    fallback = "core_offline.yaml"
    if requested != fallback and (bundle / fallback).exists() and not missing_task_files(bundle, fallback):
        log(
            f"CORE: {bundle} lacks {', '.join(missing)}; evaluating the tasks of {fallback} instead "
            f"(not comparable with a CORE over all of {requested})"
        )
        return fallback
    raise FileNotFoundError(f"CORE: {bundle} lacks the data of {', '.join(missing)} ({requested})")
