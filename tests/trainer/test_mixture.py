"""Task mixtures declared as data, CustomJSON conversations, and how conversations are packed into rows."""

import json
from pathlib import Path

import pytest
import torch

from trainer.chat_format import render_conversation
from trainer.conversation_loader import ConversationLoader
from trainer.mixture import DEFAULTS_DIR, Mixture, identity_conversations, load_mixture, read_jsonl
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer


def conversation(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@pytest.fixture
def settings(tmp_path: Path) -> TrainerSettings:
    return TrainerSettings(base_dir=tmp_path / "base", data_dir=tmp_path / "kit")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_customjson_takes_both_line_formats(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [{"messages": conversation("hi", "hello")}, conversation("2+2?", "4")],  # the kit's format: a list
    )
    assert read_jsonl(path) == [
        {"messages": conversation("hi", "hello")},
        {"messages": conversation("2+2?", "4")},
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "mine.jsonl:2: Expecting property name"),
        ('{"conversation": []}', "mine.jsonl:2: 'messages'"),
        ('[{"role": "assistant", "content": "hi"}]', "mine.jsonl:2: message 0: roles must alternate"),
    ],
)
def test_a_bad_customjson_line_is_named(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps(conversation("hi", "hello")) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_jsonl(path)


def test_a_mixture_file_repeats_cuts_and_shuffles_its_entries(tmp_path: Path, settings) -> None:
    write_jsonl(tmp_path / "a.jsonl", [conversation(f"a{i}", "x") for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [conversation(f"b{i}", "y") for i in range(10)])
    (tmp_path / "mix.yaml").write_text(
        "train:\n"
        "  - {source: jsonl, path: a.jsonl, epochs: 2.5}\n"  # relative to the mixture file
        "  - {source: jsonl, path: b.jsonl, rows: 3}\n"
        "  - {source: identity-template, rows: 4}\n"  # the packaged identity.yaml
        "  - {source: gsm8k, split: train, optional: true}\n"  # not in this kit: skipped
        "val:\n"
        "  - {source: jsonl, path: b.jsonl}\n"
    )
    mixture = load_mixture(settings, tmp_path / "mix.yaml", "train")
    questions = [c["messages"][0]["content"] for c in mixture.conversations]
    assert len(mixture) == 25 + 3 + 4 and mixture.parts[:2] == [
        ("jsonl/a.jsonl ×2.5", 25),
        ("jsonl/b.jsonl", 3),
    ]
    assert sorted(q for q in questions if q.startswith("a")) == sorted(
        [f"a{i}" for i in range(10)] * 2 + [f"a{i}" for i in range(5)]
    )
    assert sorted(q for q in questions if q.startswith("b")) == ["b0", "b1", "b2"]
    assert questions[:25] != [f"a{i}" for i in range(10)] * 2 + [f"a{i}" for i in range(5)]  # shuffled
    assert load_mixture(settings, tmp_path / "mix.yaml", "train").conversations == mixture.conversations
    assert len(load_mixture(settings, tmp_path / "mix.yaml", "val")) == 10


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{source: gsm8k, split: train}", r"mix.yaml train\[1\]: .*gsm8k/train.parquet is not in the local"),
        ("{source: reddit}", r"mix.yaml train\[1\]: unknown source 'reddit'"),
        ("{source: jsonl, path: a.jsonl, weight: 2}", r"unknown keys \['weight'\]"),
        ("{source: spelling-bee}", "a spelling-bee entry needs rows: N"),
        ("{source: identity}", r"identity/identity_conversations.jsonl is not in the local data kit"),
    ],
)
def test_a_bad_mixture_entry_is_named(tmp_path: Path, settings, entry: str, message: str) -> None:
    (tmp_path / "mix.yaml").write_text(f"train:\n  - {entry}\n")
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_mixture(settings, tmp_path / "mix.yaml", "train")


def test_identity_template_conversations_come_from_the_editable_template(tmp_path: Path) -> None:
    template = tmp_path / "me.yaml"
    template.write_text(
        "facts: {name: Ada}\ntopics:\n  - user: ['Who are you?']\n    assistant: ['I am {name}.']\n"
    )
    conversations = identity_conversations(template, rows=3)
    assert conversations == [{"messages": conversation("Who are you?", "I am Ada.")}] * 3
    packaged = identity_conversations(DEFAULTS_DIR / "identity.yaml", rows=50)
    assert any("nanochat" in c["messages"][-1]["content"] for c in packaged)


def loader(tokenizer: Tokenizer, mixture: Mixture, seq_len: int = 63, **kwargs) -> ConversationLoader:
    return ConversationLoader(tokenizer, mixture, batch_size=2, seq_len=seq_len, buffer_size=8, **kwargs)


def make_mixture(count: int) -> Mixture:
    rows = [
        {"messages": conversation(f"question {i} " * (1 + i % 5), f"answer {i} " * (1 + i % 7))}
        for i in range(count)
    ]
    return Mixture(rows, [("test", count)])


def test_targets_are_the_assistant_tokens_only(tiny_tokenizer: Tokenizer) -> None:
    mixture = make_mixture(1)
    ids, mask = render_conversation(tiny_tokenizer, mixture[0]["messages"])
    n = len(ids) - 1
    inputs, targets = next(loader(tiny_tokenizer, mixture, seq_len=n + 5))  # no room for a second
    assert inputs[0, :n].tolist() == ids[:-1]
    assert targets[0, :n].tolist() == [t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]
    assert (targets[0, n:] == -1).all()  # padding is never trained on
    learned = [t for t in targets[0].tolist() if t >= 0]
    assert tiny_tokenizer.decode(learned) == "answer 0 <|assistant_end|>"  # not a token of the question


def test_the_classic_mid_learns_every_token_but_the_padding(tiny_tokenizer: Tokenizer) -> None:
    """nanochat 348fbb3's mid_train masks nothing but padding: the user's words, the special tokens and
    the next conversation's BOS are targets too."""
    bos = tiny_tokenizer.bos_token_id
    mixture = make_mixture(30)
    batches = loader(tiny_tokenizer, mixture, seq_len=255, learn_all=True)
    learned = set()
    for _ in range(5):
        inputs, targets = next(batches)
        for row, row_targets in zip(inputs.tolist(), targets.tolist(), strict=True):
            tokens = [*row, row_targets[-1] if row_targets[-1] >= 0 else bos]
            padding = len(tokens)  # where the trailing run of BOS starts: no conversation ends with BOS
            while tokens[padding - 1] == bos:
                padding -= 1
            assert row_targets[: padding - 1] == tokens[1:padding]
            assert set(row_targets[padding - 1 :]) <= {-1}
            learned.update(row_targets)
    questions = {t for c in mixture.conversations for t in tiny_tokenizer.encode(c["messages"][0]["content"])}
    assert learned & questions and bos in learned


def test_packed_rows_start_with_a_conversation_and_padding_never_cuts_one(tiny_tokenizer: Tokenizer) -> None:
    mixture = make_mixture(40)
    bos = tiny_tokenizer.bos_token_id
    whole = {tuple(render_conversation(tiny_tokenizer, c["messages"], 63)[0]) for c in mixture.conversations}
    batches = loader(tiny_tokenizer, mixture)
    for _ in range(10):
        inputs, targets = next(batches)
        assert inputs.shape == (2, 63)
        for row, row_targets in zip(inputs.tolist(), targets.tolist(), strict=True):
            assert row[0] == bos
            tokens = [*row, row_targets[-1]] if row_targets[-1] >= 0 else row
            starts = [i for i, t in enumerate(tokens) if t == bos]
            pieces = [tuple(tokens[a:b]) for a, b in zip(starts, [*starts[1:], len(tokens)], strict=True)]
            assert all(p in whole or set(p) == {bos} for p in pieces)  # whole conversations, or padding
    assert batches.progress == batches.consumed / 40 > 0


def test_the_classic_sft_puts_one_conversation_in_each_row_padded_to_the_longest(
    tiny_tokenizer: Tokenizer,
) -> None:
    mixture = make_mixture(6)
    rendered = [render_conversation(tiny_tokenizer, c["messages"], 63) for c in mixture.conversations]
    batches = loader(tiny_tokenizer, mixture, one_per_row=True)
    for first in (0, 2, 4):
        inputs, targets = next(batches)
        width = max(len(rendered[first][0]), len(rendered[first + 1][0])) - 1
        assert inputs.shape == (2, width)  # as long as the longer conversation, not seq_len
        for row, row_targets, (ids, mask) in zip(
            inputs.tolist(), targets.tolist(), [rendered[first], rendered[first + 1]], strict=True
        ):
            n = len(ids) - 1
            assert row[:n] == ids[:-1]
            assert row_targets[:n] == [t if m else -1 for t, m in zip(ids[1:], mask[1:], strict=True)]
            assert all(t == -1 for t in row_targets[n:])
    assert batches.progress == 1.0


def test_the_loader_state_restores_the_same_following_batches(tiny_tokenizer: Tokenizer) -> None:
    mixture = make_mixture(30)
    first = loader(tiny_tokenizer, mixture, rank=1, world_size=2)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON-like data
    second = loader(tiny_tokenizer, mixture, rank=1, world_size=2, state=state)
    for _ in range(5):
        for a, b in zip(next(first), next(second), strict=True):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="resume with the same mixture"):
        loader(tiny_tokenizer, make_mixture(31), state=state)
