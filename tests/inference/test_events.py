"""Events that queued up while a client was slow reach it merged: each sequence's text and tokens
joined in order, nothing lost, prompt scores still ahead of the text they precede."""

from inference.completions import merged
from inference.scheduler import Output, PromptScores, TokenScore


def token(t: int) -> TokenScore:
    return TokenScore(t, -float(t), [])


def test_queued_outputs_of_a_sequence_merge_in_order_and_keep_their_finish_reason() -> None:
    scores = PromptScores(0, [None])
    batch = [
        scores,
        Output(0, "Hel", [token(1)]),
        Output(1, "Wo", [token(5)]),
        Output(0, "lo", [token(2)]),
        Output(1, "rld", [token(6)], "length"),
        Output(0, "!", [token(3)], "stop"),
    ]
    assert merged(batch) == [
        scores,
        Output(0, "Hello!", [token(1), token(2), token(3)], "stop"),
        Output(1, "World", [token(5), token(6)], "length"),
    ]
    assert merged(batch[:2]) == batch[:2]  # nothing to merge: the events as they came
