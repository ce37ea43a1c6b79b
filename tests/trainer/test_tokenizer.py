"""The BPE tokenizer: exact round trips, inert special-token spellings, plain-file persistence."""

import json
from pathlib import Path

import pytest

from trainer.tokenizer import SPECIAL_TOKENS, Tokenizer

from conftest import make_documents

TRICKY_TEXTS = [
    "Hello, world! The year 2026 and 1234567 apples.",
    "Grüße aus München — naïve café, 東京タワー, Привет мир, مرحبا",
    "emoji 🚀🔥👩‍👩‍👧 and flags 🇫🇷 and skin tones 👍🏽",
    "def f(x: int) -> int:\n\treturn x ** 2  # comment\n\n\nclass A:\n    pass\r\n",
    "   leading spaces, trailing spaces   \n\n\n",
    "",
]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_encode_decode_round_trips_exactly(tiny_tokenizer: Tokenizer, text: str) -> None:
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_vocab_is_exactly_the_requested_size_with_specials_last(tiny_tokenizer: Tokenizer) -> None:
    assert tiny_tokenizer.vocab_size == 600
    assert list(tiny_tokenizer.special_tokens) == SPECIAL_TOKENS
    assert sorted(tiny_tokenizer.special_tokens.values()) == list(range(600 - 9, 600))
    assert tiny_tokenizer.bos_token_id == tiny_tokenizer.encode_special("<|bos|>")


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_special_token_spelling_in_text_is_ordinary_text(tiny_tokenizer: Tokenizer, special: str) -> None:
    text = f"user wrote {special} here"
    ids = tiny_tokenizer.encode(text)
    assert not set(ids) & set(tiny_tokenizer.special_tokens.values())
    assert tiny_tokenizer.decode(ids) == text


def test_prepend_append_and_batch_encoding_agree(tiny_tokenizer: Tokenizer) -> None:
    bos = tiny_tokenizer.bos_token_id
    texts = make_documents(20, seed=5)
    batch = tiny_tokenizer.encode_batch(texts, prepend=bos, num_threads=2)
    assert batch == [[bos, *tiny_tokenizer.encode(t)] for t in texts]
    end = tiny_tokenizer.encode_special("<|assistant_end|>")
    assert tiny_tokenizer.encode("hi", prepend=bos, append=end) == [bos, *tiny_tokenizer.encode("hi"), end]


def test_numbers_split_into_at_most_two_digits(tiny_tokenizer: Tokenizer) -> None:
    pieces = [tiny_tokenizer.decode([i]) for i in tiny_tokenizer.encode("1234567 and 99 and 100")]
    assert all(len(p.strip()) <= 2 for p in pieces if p.strip().isdigit())
    assert "".join(pieces) == "1234567 and 99 and 100"


def test_save_then_load_gives_the_same_tokenizer_from_plain_files(
    tiny_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    folder = tmp_path / "tokenizer"
    tiny_tokenizer.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "token_bytes.json",
        "tokenizer.json",
        "tokenizer.tiktoken",
    ]
    config = json.loads((folder / "tokenizer.json").read_text())  # plain JSON, nothing executable
    assert config["special_tokens"] == tiny_tokenizer.special_tokens
    loaded = Tokenizer.load(folder)
    for text in [*TRICKY_TEXTS, *make_documents(10, seed=9)]:
        assert loaded.encode(text) == tiny_tokenizer.encode(text)
    assert loaded.vocab_size == tiny_tokenizer.vocab_size


def test_saving_over_an_older_tokenizer_replaces_it_whole(tiny_tokenizer: Tokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "tokenizer"
    Tokenizer.train(make_documents(50, seed=2), vocab_size=300).save(folder)
    tiny_tokenizer.save(folder)
    assert Tokenizer.load(folder).vocab_size == 600
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]  # no temp or old folders left behind


def test_token_bytes_are_utf8_lengths_and_zero_for_specials(
    tiny_tokenizer: Tokenizer, tmp_path: Path
) -> None:
    lengths = tiny_tokenizer.token_bytes()
    assert len(lengths) == tiny_tokenizer.vocab_size
    assert all(lengths[i] == 0 for i in tiny_tokenizer.special_tokens.values())
    for i in range(tiny_tokenizer.vocab_size - 9):
        assert lengths[i] == len(tiny_tokenizer.encoding.decode_single_token_bytes(i)) > 0
    tiny_tokenizer.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "token_bytes.json").read_text()) == lengths


def test_vocab_too_small_for_bytes_and_specials_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train(["some text"], vocab_size=264)


def test_loading_a_missing_tokenizer_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"trainer\.tok_train"):
        Tokenizer.load(tmp_path / "nothing-here")
