"""
A GPT-4-style BPE tokenizer: trained with rustbpe (Rust, parallel), run with tiktoken (fast encoding).

Saved as plain data, so loading a tokenizer never executes code (no pickle):
    tokenizer.tiktoken   mergeable ranks, one "<base64 token> <rank>" line each (tiktoken's own format)
    tokenizer.json       split pattern and the special tokens' ids
    token_bytes.json     UTF-8 byte length of every token id, 0 for specials (for bits-per-byte)
"""

import base64
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import rustbpe
import tiktoken

from trainer.common import make_temp_dir, replace_dir

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document; the dataloader aligns rows on it
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls the Python tool ...
    "<|python_end|>",
    "<|output_start|>",  # ... and the tool's output is pasted back in
    "<|output_end|>",
]

# GPT-4's split pattern, except numbers split into runs of at most 2 digits (GPT-4: 3). With a small
# vocab, spending fewer merges on 3-digit numbers is a better trade (as nanochat found).
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte tokens and the specials, no merges
RANKS_FILE, CONFIG_FILE, TOKEN_BYTES_FILE = "tokenizer.tiktoken", "tokenizer.json", "token_bytes.json"


class Tokenizer:
    """Text ↔ token ids. Special tokens are only produced by encode_special, never from text."""

    def __init__(self, ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN) -> None:
        assert sorted(ranks.values()) == list(range(len(ranks))), "ranks must be exactly 0..n-1"
        self.ranks, self.pattern = ranks, pattern
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.encoding = tiktoken.Encoding(
            name="nanochat", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials
        )
        self.bos_token_id = specials["<|bos|>"]

    # -- training and persistence ------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Learn vocab_size - 9 tokens (256 bytes + merges), so the 9 specials fit inside vocab_size."""
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + 9 specials)")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        return cls(dict(trainer.get_mergeable_ranks()), trainer.get_pattern())

    def save(self, folder: Path) -> None:
        """Write all three files into a temp folder, then swap it in: a tokenizer folder is always whole."""
        folder = Path(folder)
        tmp = make_temp_dir(folder)
        try:
            ranks = sorted(self.ranks.items(), key=lambda item: item[1])
            lines = (f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in ranks)
            (tmp / RANKS_FILE).write_text("".join(lines), encoding="ascii")
            config = {"pattern": self.pattern, "special_tokens": self.special_tokens}
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            (tmp / TOKEN_BYTES_FILE).write_text(json.dumps(self.token_bytes()), encoding="utf-8")
            replace_dir(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: Path) -> "Tokenizer":
        folder = Path(folder)
        if not (folder / RANKS_FILE).exists():
            raise FileNotFoundError(f"no tokenizer in {folder}: train one with `python -m trainer.tok_train`")
        ranks = {}
        for line in (folder / RANKS_FILE).read_text(encoding="ascii").splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        tokenizer = cls(ranks, config["pattern"])
        if tokenizer.special_tokens != config["special_tokens"]:
            raise ValueError(f"{folder / CONFIG_FILE}: special tokens do not match this code's")
        return tokenizer

    # -- vocabulary ---------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return {name: self.encoding.encode_single_token(name) for name in SPECIAL_TOKENS}

    def encode_special(self, name: str) -> int:
        return self.encoding.encode_single_token(name)

    def token_bytes(self) -> list[int]:
        """UTF-8 length of each token id (0 for specials): bits-per-byte divides by these, not by tokens."""
        lengths = [0] * self.vocab_size
        for token, rank in self.ranks.items():
            lengths[rank] = len(token)
        return lengths

    # -- encoding -----------------------------------------------------------------

    def encode(self, text: str, prepend: int | None = None, append: int | None = None) -> list[int]:
        """Encode as ordinary text: a special token's spelling inside text stays plain characters."""
        ids = self.encoding.encode_ordinary(text)
        return ([prepend] if prepend is not None else []) + ids + ([append] if append is not None else [])

    def encode_batch(
        self, texts: list[str], prepend: int | None = None, num_threads: int | None = None
    ) -> list[list[int]]:
        """Encode many texts on several threads (tiktoken releases the GIL)."""
        threads = num_threads or min(8, os.cpu_count() or 1)
        batch = self.encoding.encode_ordinary_batch(texts, num_threads=threads)
        return batch if prepend is None else [[prepend, *ids] for ids in batch]

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The raw bytes of the tokens: one character may span several tokens (see engine.TextStream)."""
        return self.encoding.decode_bytes(ids)
