"""
Our tokenizer as a Hugging Face fast tokenizer (tokenizer.json), and back.

tiktoken and a byte-level BPE in `tokenizers` compute the same ids when:
- the vocabulary is the ranks, each token's bytes written in GPT-2's byte↔unicode alphabet;
- the merges are every split of a token into two tokens, ordered by the merged token's rank (tiktoken
  merges the adjacent pair whose concatenation has the lowest rank);
- a pre-token that is a whole token is taken as it is (`ignore_merges`, as tiktoken does);
- the split pattern is a `Split` pre-tokenizer, the special tokens added tokens after the ranks.
The tests check the ids on real text. Reading one back takes the ranks from the ids and refuses a BPE
whose merge order is not its id order (it would not encode like tiktoken).
"""

import functools
import json
from pathlib import Path
from typing import Any

from trainer.chat_format import CHAT_TEMPLATE
from trainer.tokenizer import SPECIAL_TOKENS, Tokenizer


class TokenizerRefused(ValueError):
    """A tokenizer.json this code cannot read as a tiktoken-style BPE, with the reason."""


@functools.cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the byte-level BPE's alphabet): printable Latin-1 bytes
    stand for themselves, the others for the characters from U+0100 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def to_text(token: bytes) -> str:
    alphabet = byte_alphabet()
    return "".join(alphabet[b] for b in token)


def to_bytes(text: str) -> bytes:
    inverse = {c: b for b, c in byte_alphabet().items()}
    try:
        return bytes(inverse[c] for c in text)
    except KeyError as error:
        raise TokenizerRefused(f"token {text!r} is not in the byte-level alphabet") from error


def merges(ranks: dict[bytes, int]) -> list[list[str]]:
    """Every (left, right) whose concatenation is a token, in the merged token's rank order."""
    pairs = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                pairs.append((rank, ranks[left], ranks[right], left, right))
    return [[to_text(left), to_text(right)] for *_, left, right in sorted(pairs)]


def tokenizer_json(tokenizer: Tokenizer) -> dict[str, Any]:
    """tokenizer.json of the `tokenizers` library: byte-level BPE, BOS prepended to a single text."""
    bos = "<|bos|>"
    added = [
        {"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for name, i in tokenizer.special_tokens.items()
    ]  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": tokenizer.pattern},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [tokenizer.bos_token_id], "tokens": [bos]}},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {to_text(token): rank for token, rank in tokenizer.ranks.items()},
            "merges": merges(tokenizer.ranks),
        },
    }


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """tokenizer_config.json: the fast tokenizer class, our special tokens and the chat template."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|assistant_end|>",
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def write(tokenizer: Tokenizer, folder: Path, model_max_length: int) -> None:
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(tokenizer), ensure_ascii=False) + "\n")
    config = json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False)
    (folder / "tokenizer_config.json").write_text(config + "\n")


def read(path: Path) -> Tokenizer:
    """A tokenizer.json written as above (by us, or by a converter of nanochat's tiktoken ranks)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise TokenizerRefused(f"{path}: a {model.get('type')} model, not a byte-level BPE")
    ranks = {to_bytes(text): rank for text, rank in model["vocab"].items()}
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerRefused(f"{path}: the vocabulary's ids are not 0..{len(ranks) - 1}")
    merged = [
        to_bytes(a) + to_bytes(b)
        for a, b in (m if isinstance(m, list) else m.split(" ") for m in model["merges"])
    ]
    merge_ranks = [ranks.get(token, -1) for token in merged]
    if merge_ranks != sorted(merge_ranks) or min(merge_ranks, default=0) < 0:
        raise TokenizerRefused(
            f"{path}: its merge order is not its id order, so it would not encode as tiktoken"
        )
    pattern = next(
        (
            p["pattern"]["Regex"]
            for p in data.get("pre_tokenizer", {}).get("pretokenizers", [])
            if p["type"] == "Split"
        ),
        None,
    )
    if pattern is None:
        raise TokenizerRefused(f"{path}: no split pattern (a Sequence pre-tokenizer with a Split regex)")
    tokenizer = Tokenizer(ranks, pattern)
    specials = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t["content"] in SPECIAL_TOKENS}
    if specials != tokenizer.special_tokens:
        raise TokenizerRefused(
            f"{path}: its special tokens {specials} are not ours "
            f"({', '.join(SPECIAL_TOKENS)}, after the ranks)"
        )
    return tokenizer
