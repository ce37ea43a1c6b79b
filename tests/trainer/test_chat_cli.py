"""The chat CLI's replies: one cut at --max-tokens inside a character ends before it, on the screen and
in the history that the next turn sends back to the model."""

import argparse

import pytest

from tests.support import ends_inside_a_character
from tests.trainer.test_engine import random_model
from trainer.chat_cli import reply
from trainer.chat_format import render_for_completion
from trainer.engine import Engine
from trainer.tokenizer import SPECIAL_TOKENS, Tokenizer


def test_a_reply_cut_inside_a_character_ends_before_it(
    tiny_tokenizer: Tokenizer, capsys: pytest.CaptureFixture
) -> None:
    engine = Engine(random_model(tiny_tokenizer.vocab_size, seed=3), tiny_tokenizer)
    ordinary = tiny_tokenizer.vocab_size - len(SPECIAL_TOKENS)
    for number in range(40):  # a greedy reply and a length at which its bytes end inside a character
        messages = [{"role": "user", "content": f"Question {number}: what now?"}]
        prompt = render_for_completion(tiny_tokenizer, messages)
        (tokens,) = engine.complete(prompt, max_tokens=64 - len(prompt), temperature=0)
        ids = [t.id for t in tokens]
        plain = ids[: next((i for i, t in enumerate(ids) if t >= ordinary), len(ids))]
        cuts = [
            k for k in range(1, len(plain)) if ends_inside_a_character(tiny_tokenizer.decode_bytes(plain[:k]))
        ]
        if cuts:
            break
    else:
        pytest.fail("no greedy reply split a character: the test needs one")
    cut_bytes = tiny_tokenizer.decode_bytes(plain[: cuts[0]])
    complete = cut_bytes.decode("utf-8", errors="replace").removesuffix("\ufffd")

    args = argparse.Namespace(max_tokens=cuts[0], temperature=0.0, top_k=50)
    assert reply(engine, messages, args, seed=0) == [{"type": "text", "text": complete}]
    assert capsys.readouterr().out == complete + "\n"
