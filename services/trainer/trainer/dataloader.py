"""
Pretraining batches: documents streamed from parquet row groups, tokenized on the fly in batches, and
packed into rows of seq_len+1 tokens with BOS-aligned best-fit packing:

- every document is tokenized with a leading BOS, and every row starts at a document start;
- a row is filled with the largest buffered document that still fits (the earliest of equals);
- only when no buffered document fits is one cropped to fill the row (the shortest; the rest of it
  is dropped). `crop_fraction` reports how many tokens that costs;
- with split_docs, a document longer than a row enters the buffer as row-sized chunks that each start
  with BOS, so long documents are not cropped away (at the price of context across chunk borders).

Row groups are striped over DDP ranks (rank r reads groups r, r+W, r+2W, …), so ranks never read the
same document. `state_dict()` names the cursor and every buffered document by its location, so a
checkpoint restores exactly the same following batches (buffered documents are re-read and re-tokenized).
"""

import bisect
import hashlib
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from trainer.tokenizer import Tokenizer

DocKey = tuple[str, int, int]  # (shard file name, row group, row)
PieceKey = tuple[str, int, int, int]  # a document's key + its chunk number (0 when not split)


class PackingLoader:
    def __init__(
        self,
        tokenizer: Tokenizer,
        shards: list[Path],
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        buffer_docs: int = 1000,
        tokenizer_batch: int = 128,
        split_docs: bool = False,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.tokenizer, self.batch_size, self.row_len = tokenizer, batch_size, seq_len + 1
        self.device = torch.device(device)
        self.buffer_docs, self.tokenizer_batch, self.split_docs = buffer_docs, tokenizer_batch, split_docs
        self.files = {path.name: pq.ParquetFile(path) for path in shards}
        every_group = [(name, g) for name, f in self.files.items() for g in range(f.num_row_groups)]
        self.groups = every_group[rank::world_size]
        assert self.groups, f"rank {rank} of {world_size} has no row groups: more ranks than row groups"
        # Cursor: the next unread document. Buffer: (length, arrival number, piece key, tokens), sorted.
        self.epoch = self.group_pos = self.row_pos = 0
        self.arrivals = 0
        self.buffer: list[tuple[int, int, PieceKey, list[int]]] = []
        self.tokens_consumed = self.tokens_cropped = 0
        self.cached_group: tuple[str, int] | None = None
        self.cached_texts: list[str] = []
        if state is not None:
            self.load_state_dict(state)

    # -- reading --------------------------------------------------------------------

    def texts_of(self, name: str, group: int) -> list[str]:
        if self.cached_group != (name, group):
            table = self.files[name].read_row_group(group, columns=["text"])
            self.cached_group, self.cached_texts = (name, group), table.column("text").to_pylist()
        return self.cached_texts

    def read_next_batch(self) -> list[tuple[DocKey, str]]:
        """The next tokenizer_batch documents after the cursor, moving it (looping over epochs)."""
        while True:
            name, group = self.groups[self.group_pos]
            texts = self.texts_of(name, group)
            if self.row_pos < len(texts):
                rows = range(self.row_pos, min(self.row_pos + self.tokenizer_batch, len(texts)))
                self.row_pos = rows.stop
                return [((name, group, row), texts[row]) for row in rows]
            self.group_pos, self.row_pos = self.group_pos + 1, 0
            if self.group_pos == len(self.groups):
                self.group_pos, self.epoch = 0, self.epoch + 1

    def pieces(self, key: DocKey, tokens: list[int]) -> list[tuple[PieceKey, list[int]]]:
        """A document as buffer entries: whole, or (split_docs) chunks of at most a row, each BOS-first."""
        if not self.split_docs or len(tokens) <= self.row_len:
            return [((*key, 0), tokens)]
        step = self.row_len - 1
        rest = range(self.row_len, len(tokens), step)
        chunks = [
            tokens[: self.row_len],
            *([self.tokenizer.bos_token_id, *tokens[i : i + step]] for i in rest),
        ]
        return [((*key, i), chunk) for i, chunk in enumerate(chunks)]

    def add_to_buffer(
        self, docs: list[tuple[DocKey, str]], arrivals: list[int], wanted: list[set[int]] | None = None
    ) -> None:
        """Tokenize the documents (BOS first) into the length-sorted buffer (only `wanted` chunk numbers)."""
        token_lists = self.tokenizer.encode_batch(
            [text for _, text in docs], prepend=self.tokenizer.bos_token_id
        )
        for i, ((key, _), arrival, tokens) in enumerate(zip(docs, arrivals, token_lists, strict=True)):
            for piece_key, piece in self.pieces(key, tokens):
                if wanted is None or piece_key[3] in wanted[i]:
                    bisect.insort(self.buffer, (len(piece), arrival, piece_key, piece))

    def refill(self) -> None:
        while len(self.buffer) < self.buffer_docs:
            docs = self.read_next_batch()
            arrivals = list(range(self.arrivals, self.arrivals + len(docs)))
            self.arrivals += len(docs)
            self.add_to_buffer(docs, arrivals)

    # -- packing --------------------------------------------------------------------

    def pack_row(self) -> list[int]:
        row: list[int] = []
        while len(row) < self.row_len:
            self.refill()
            remaining = self.row_len - len(row)
            fits = bisect.bisect_right(self.buffer, (remaining, math.inf)) - 1  # largest length <= remaining
            # Among equally long documents the one buffered first (as the reference picks); when nothing
            # fits, the shortest is cropped.
            length = self.buffer[fits][0] if fits >= 0 else 0
            tokens = self.buffer.pop(bisect.bisect_left(self.buffer, (length, -1)))[3]
            row.extend(tokens[:remaining])
            self.tokens_consumed += len(tokens)
            self.tokens_cropped += max(0, len(tokens) - remaining)
        return row

    def __iter__(self) -> "PackingLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each batch_size × seq_len, targets shifted by one token."""
        rows = torch.tensor([self.pack_row() for _ in range(self.batch_size)], dtype=torch.long)
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        rows = rows.to(self.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]

    @property
    def crop_fraction(self) -> float:
        """Share of the documents' tokens taken from the buffer so far that were cropped away."""
        return self.tokens_cropped / max(1, self.tokens_consumed)

    # -- exact resume ---------------------------------------------------------------

    def fingerprint(self) -> str:
        """Identifies this rank's row groups and chunking: a state only fits a loader reading the same way."""
        return hashlib.sha256(repr((self.groups, self.split_docs)).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable; restores the exact same following batches."""
        return {
            "fingerprint": self.fingerprint(),
            "epoch": self.epoch,
            "group_pos": self.group_pos,
            "row_pos": self.row_pos,
            "arrivals": self.arrivals,
            "tokens_consumed": self.tokens_consumed,
            "tokens_cropped": self.tokens_cropped,
            "buffer": [[arrival, *key] for _, arrival, key, _ in self.buffer],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.fingerprint():
            raise ValueError(
                "dataloader state was saved over different data, rank/world size or document splitting; "
                "resume with the same shards, the same number of processes and the same --split-docs"
            )
        for name in ("epoch", "group_pos", "row_pos", "arrivals", "tokens_consumed", "tokens_cropped"):
            setattr(self, name, state[name])
        self.buffer = []
        # One entry per buffered document (its chunks grouped), sorted by location so that each row
        # group is read once.
        chunks: dict[tuple, set[int]] = {}
        for arrival, name, group, row, chunk in state["buffer"]:
            chunks.setdefault((name, group, row, arrival), set()).add(chunk)
        entries = sorted(chunks)
        docs = [((name, group, row), self.texts_of(name, group)[row]) for name, group, row, _ in entries]
        self.add_to_buffer(docs, [entry[3] for entry in entries], [chunks[entry] for entry in entries])
