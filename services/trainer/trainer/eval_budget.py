"""
When and how much a run evaluates.

Cadence (--eval-every, --core-metric-every, --chatcore-every, --sample-every): N > 0 evaluates every N
steps and at the last step, 0 only at the last step, -1 never, not at the last step either (the
reference's "-1 = disable").

Budget (--eval-tokens, --core-metric-max-per-task, --chatcore-max-cat, --chatcore-max-sample, and
base_eval's --split-tokens, --max-per-task): on CUDA the reference's, which are sized for a node of 8
GPUs. Elsewhere (a CPU, a Mac) those would take far longer than the training they measure (42M val
tokens after an 82k-token run), so each kind of evaluation reads, per evaluation, about as many tokens
as the run trained on per evaluation (at most the reference's budget). A forward pass is a third of a
training step's compute (2N vs 6N FLOPs a token), so val bpb costs about a third of the training, and
CORE or ChatCORE about another third. A flag that is given always wins; the program prints what it
chose and why.
"""

import math

import torch

from trainer.chat_format import render_conversation
from trainer.common import print0
from trainer.mixture import Mixture
from trainer.tokenizer import Tokenizer

# What one item of an evaluation costs, in tokens of a batched forward pass, measured on the data kit with
# a vocab-8,192 tokenizer and a d4 on 2 CPU cores (bench/RESULTS.md, evaluation cost):
# - a CORE example forwards ~1,700 tokens: one prompt per choice, padded to the longest (mean over the 20
#   offline tasks; 39 for COPA, 8,561 for language identification);
# - a ChatCORE multiple-choice problem ~200: a 100-160-token prompt, padded in its batch;
# - a generated token ~60: one decoding step of one row is overhead-bound (2.6 s for 512 tokens, against
#   12k tokens/s for CORE's batched forwards: 2,000 examples in 276 s), so a generative problem costs
#   max_new_tokens × 60.
CORE_EXAMPLE_TOKENS = 1_700
CHOICE_PROBLEM_TOKENS = 200
GENERATED_TOKEN_COST = 60


def due(every: int, step: int, last: bool, at_start: bool = False) -> bool:
    """Whether an every-N-steps evaluation runs at `step`: every N steps (step 0 too when `at_start`)
    and at the last step; 0: only at the last step; -1: never."""
    if every < 0:
        return False
    return last or (every > 0 and step % every == 0 and (at_start or step > 0))


def evaluations(every: int, steps: int, at_start: bool = False) -> int:
    """How many times `due` is true in a run of `steps` steps (steps 0 … steps)."""
    if every <= 0:
        return 0 if every < 0 else 1
    return steps // every + int(at_start) + int(steps % every != 0)


def cadence(every: int, steps: int, at_start: bool = False) -> str:
    """`due`'s schedule in words, for the log."""
    if every < 0:
        return "off"
    if every == 0 or every >= steps:
        return "at step 0 and at the last step" if every > 0 and at_start else "at the last step"
    start = " from step 0" if at_start else ""
    count = evaluations(every, steps, at_start)
    return f"every {every:,} steps{start} and at the last: {count:,} in {steps:,} steps"


def tokens_per_evaluation(every: int, steps: int, batch_tokens: int, at_start: bool = False) -> int:
    """The tokens a run trains on per evaluation of this cadence: what one evaluation may read."""
    return steps * batch_tokens // max(1, evaluations(every, steps, at_start))


def epoch_steps(tokenizer: Tokenizer, mixture: Mixture, row_len: int, batch_tokens: int) -> int:
    """About how many steps one pass over a (shuffled) mixture takes: its first 1,000 conversations' mean
    rendered length × its size, over the tokens of a step (padding left out: a lower bound)."""
    sample = range(min(1000, len(mixture)))
    lengths = [len(render_conversation(tokenizer, mixture[i]["messages"], row_len)[0]) for i in sample]
    return max(1, math.ceil(sum(lengths) / len(lengths) * len(mixture) / batch_tokens))


def pick(flag: str, given: int | None, reference: int, fitted: int, why: str, device: torch.device) -> int:
    """The flag's value if given; on CUDA the reference's; elsewhere `fitted` (`why` says how), at most the
    reference's (-1: all). Printed with where it came from."""
    shown = "all" if reference < 0 else f"{reference:,}"
    if given is not None:
        value, origin = given, "given"
    elif device.type == "cuda":
        value, origin = reference, "the reference's"
    else:
        value = fitted if reference < 0 else min(fitted, reference)
        origin = f"sized to this {device.type} run: {why}; the reference's on CUDA: {shown}"
    print0(f"eval budget: {flag} {value:,} ({origin})")
    return value


def val_tokens(
    every: int, given: int | None, reference: int, steps: int, batch_tokens: int, device: torch.device
) -> int | None:
    """--eval-tokens of a training run whose val bpb runs at this cadence (at step 0 too); None when off."""
    if every < 0:
        return None
    tokens = tokens_per_evaluation(every, steps, batch_tokens, at_start=True)
    return pick(
        "--eval-tokens", given, reference, tokens, f"the {tokens:,} tokens trained per evaluation", device
    )


def core_examples(tokens: int, tasks: int) -> int:
    """CORE examples per task that read about `tokens` over all `tasks` (at least one)."""
    return max(1, tokens // (tasks * CORE_EXAMPLE_TOKENS))


def chatcore_problems(tokens: int, tasks: int, max_new_tokens: int) -> tuple[int, int]:
    """(multiple-choice, generative) problems per task that cost about `tokens` over all `tasks`, shared
    equally (ChatCORE weighs its tasks equally); at least one of each."""
    share = tokens // tasks
    return max(1, share // CHOICE_PROBLEM_TOKENS), max(1, share // (max_new_tokens * GENERATED_TOKEN_COST))
