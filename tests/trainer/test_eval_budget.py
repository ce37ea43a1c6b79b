"""When a run evaluates (-1 never, 0 at the end, N every N steps) and how much: the reference's budgets on
CUDA, budgets sized to the run elsewhere, and a given flag above both."""

import pytest
import torch

from trainer import eval_budget
from trainer.chat_format import render_conversation
from trainer.mixture import Mixture
from trainer.tokenizer import Tokenizer

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def schedule(every: int, steps: int, at_start: bool = False) -> list[int]:
    return [s for s in range(steps + 1) if eval_budget.due(every, s, last=s == steps, at_start=at_start)]


def test_minus_one_never_evaluates_not_even_at_the_last_step() -> None:
    assert schedule(-1, 10) == [] and schedule(-1, 10, at_start=True) == []


def test_zero_evaluates_only_at_the_last_step() -> None:
    assert schedule(0, 10) == [10] and schedule(0, 10, at_start=True) == [10]


def test_n_evaluates_every_n_steps_and_at_the_last() -> None:
    assert schedule(4, 10) == [4, 8, 10]
    assert schedule(4, 10, at_start=True) == [0, 4, 8, 10]  # val bpb also measures the starting point
    assert schedule(5, 10) == [5, 10] and schedule(250, 20) == [20]


@pytest.mark.parametrize("every", [-1, 0, 1, 3, 4, 7, 20, 21, 1000])
@pytest.mark.parametrize("at_start", [False, True])
def test_the_counted_evaluations_are_the_scheduled_ones(every: int, at_start: bool) -> None:
    assert eval_budget.evaluations(every, 20, at_start) == len(schedule(every, 20, at_start))


def test_each_evaluation_may_read_the_tokens_trained_per_evaluation() -> None:
    # 300 steps of 4,096 tokens, val bpb at 0, 100, 200, 300: a quarter of the 1,228,800 tokens each.
    assert eval_budget.tokens_per_evaluation(100, 300, 4096, at_start=True) == 307_200
    assert eval_budget.tokens_per_evaluation(0, 300, 4096) == 1_228_800


def test_a_given_flag_wins_on_every_device(capsys: pytest.CaptureFixture) -> None:
    for device in (CPU, CUDA):
        assert eval_budget.pick("--eval-tokens", 4096, 80 * 2**19, 1000, "why", device) == 4096
    assert capsys.readouterr().out.count("eval budget: --eval-tokens 4,096 (given)") == 2


def test_cuda_takes_the_reference_budget(capsys: pytest.CaptureFixture) -> None:
    assert eval_budget.pick("--eval-tokens", None, 80 * 2**19, 1000, "why", CUDA) == 80 * 2**19
    assert eval_budget.pick("--chatcore-max-cat", None, -1, 7, "why", CUDA) == -1
    assert "eval budget: --eval-tokens 41,943,040 (the reference's)" in capsys.readouterr().out


def test_elsewhere_the_budget_is_sized_to_the_run_and_never_above_the_reference(
    capsys: pytest.CaptureFixture,
) -> None:
    why = "the 81,920 tokens trained per evaluation"
    assert eval_budget.pick("--eval-tokens", None, 80 * 2**19, 81_920, why, CPU) == 81_920
    assert eval_budget.pick("--core-metric-max-per-task", None, 500, 10_000, "why", CPU) == 500
    assert eval_budget.pick("--chatcore-max-cat", None, -1, 7, "why", CPU) == 7  # -1: all, no cap
    out = capsys.readouterr().out
    assert f"eval budget: --eval-tokens 81,920 (sized to this cpu run: {why}; the reference's on CUDA" in out


def test_core_and_chatcore_problems_cost_about_the_tokens_allowed() -> None:
    assert eval_budget.core_examples(20 * 1_700 * 36, tasks=20) == 36
    assert eval_budget.core_examples(4096, tasks=20) == 1  # one at least: a CORE of nothing is no CORE
    choice, generative = eval_budget.chatcore_problems(5 * 512 * 60 * 3, tasks=5, max_new_tokens=512)
    assert generative == 3 and choice == 512 * 60 * 3 // 200
    assert eval_budget.chatcore_problems(2048, tasks=5, max_new_tokens=512) == (2, 1)


def test_one_pass_over_a_mixture_is_estimated_from_its_conversations(tiny_tokenizer: Tokenizer) -> None:
    conversations = [
        {"messages": [{"role": "user", "content": "ka " * n}, {"role": "assistant", "content": "to"}]}
        for n in range(1, 41)
    ]
    tokens = sum(len(render_conversation(tiny_tokenizer, c["messages"], 129)[0]) for c in conversations)
    steps = eval_budget.epoch_steps(tiny_tokenizer, Mixture(conversations, [("all", 40)]), 129, 256)
    assert steps == -(-tokens // 256) and steps > 1


def test_the_log_says_when_each_evaluation_runs() -> None:
    assert eval_budget.cadence(-1, 300) == "off"
    assert eval_budget.cadence(0, 300, at_start=True) == "at the last step"
    assert eval_budget.cadence(2000, 300) == "at the last step"
    assert eval_budget.cadence(2000, 300, at_start=True) == "at step 0 and at the last step"
    assert (
        eval_budget.cadence(250, 300, at_start=True)
        == "every 250 steps from step 0 and at the last: 3 in 300 steps"
    )
