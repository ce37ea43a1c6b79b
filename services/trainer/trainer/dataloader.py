"""
Pretraining batches: documents streamed from parquet row groups, tokenized on the fly in batches, and
packed into rows of seq_len+1 tokens with BOS-aligned best-fit packing:

- every document is tokenized with a leading BOS, and every row starts at a document start;
- a row is filled with the largest buffered document that still fits (the earliest of equals);
- only when no buffered document fits is one cropped to fill the row (the shortest; the rest of it
  is dropped). `crop_fraction` reports how many tokens that costs;
- with split_docs, a document longer than a row enters the buffer as row-sized chunks that each start
  with BOS, so long documents are not cropped away (at the price of context across chunk borders).

Row groups are striped over DDP ranks within each shard (rank r reads groups r, r+W, r+2W, … of every
shard, as the reference does), so ranks never read the same document. Shards are opened only when the
cursor reaches them, and `wait_for_shard` is called first: training can start on the first shards while
later ones are still downloading. `state_dict()` names the cursor and every buffered document by its
location, so a checkpoint restores exactly the same following batches (buffered documents are re-read
and re-tokenized); a resumed run may plan more shards than the one it resumes, as long as those it read
come first in the same order.
"""

import bisect
import hashlib
import math
from collections.abc import Callable
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
        wait_for_shard: Callable[[Path], None] | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.tokenizer, self.batch_size, self.row_len = tokenizer, batch_size, seq_len + 1
        self.device = torch.device(device)
        self.buffer_docs, self.tokenizer_batch, self.split_docs = buffer_docs, tokenizer_batch, split_docs
        self.rank, self.world_size = rank, world_size
        self.shards = {path.name: path for path in shards}
        self.names = [path.name for path in shards]
        self.wait_for_shard = wait_for_shard or (lambda path: None)
        self.group_counts: dict[str, int] = {}
        # Cursor: the next unread document. Buffer: (length, arrival number, piece key, tokens), sorted.
        self.epoch = self.shard_pos = self.row_pos = 0
        self.group = rank
        self.arrivals = 0
        self.buffer: list[tuple[int, int, PieceKey, list[int]]] = []
        self.tokens_consumed = self.tokens_cropped = 0
        self.cached_group: tuple[str, int] | None = None
        self.cached_texts: list[str] = []
        if state is not None:
            self.load_state_dict(state)

    # -- reading --------------------------------------------------------------------

    def open_shard(self, name: str) -> pq.ParquetFile:
        if name not in self.group_counts:  # the first time: it may still be downloading
            self.wait_for_shard(self.shards[name])
        parquet = pq.ParquetFile(self.shards[name])
        self.group_counts[name] = parquet.num_row_groups
        return parquet

    def row_groups(self, name: str) -> int:
        return self.group_counts[name] if name in self.group_counts else self.open_shard(name).num_row_groups

    def texts_of(self, name: str, group: int) -> list[str]:
        if self.cached_group != (name, group):
            table = self.open_shard(name).read_row_group(group, columns=["text"])
            self.cached_group, self.cached_texts = (name, group), table.column("text").to_pylist()
        return self.cached_texts

    def read_next_batch(self) -> list[tuple[DocKey, str]]:
        """The next tokenizer_batch documents after the cursor, moving it (looping over epochs)."""
        while True:
            name = self.names[self.shard_pos]
            if self.group < self.row_groups(name):
                texts = self.texts_of(name, self.group)
                if self.row_pos < len(texts):
                    rows = range(self.row_pos, min(self.row_pos + self.tokenizer_batch, len(texts)))
                    self.row_pos = rows.stop
                    return [((name, self.group, row), texts[row]) for row in rows]
                self.group, self.row_pos = self.group + self.world_size, 0
                continue
            self.shard_pos, self.group, self.row_pos = self.shard_pos + 1, self.rank, 0
            if self.shard_pos == len(self.names):
                if all(self.row_groups(n) <= self.rank for n in self.names):
                    raise ValueError(
                        f"rank {self.rank} of {self.world_size} has no row groups: every shard has fewer "
                        "row groups than there are processes"
                    )
                self.shard_pos, self.epoch = 0, self.epoch + 1

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
        """Identifies how this loader splits the data: a state only fits a loader that does the same."""
        return hashlib.sha256(repr((self.rank, self.world_size, self.split_docs)).encode()).hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable; restores the exact same following batches."""
        return {
            "fingerprint": self.fingerprint(),
            # The shards read so far, in order: a resumed loader must read these the same way first.
            "shards_read": self.names[: self.shard_pos + 1] if self.epoch == 0 else self.names,
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "group": self.group,
            "row_pos": self.row_pos,
            "arrivals": self.arrivals,
            "tokens_consumed": self.tokens_consumed,
            "tokens_cropped": self.tokens_cropped,
            "buffer": [[arrival, *key] for _, arrival, key, _ in self.buffer],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("fingerprint") != self.fingerprint():
            raise ValueError(
                "dataloader state was saved by another number of processes or document splitting; resume "
                "with the same number of processes and the same --split-docs"
            )
        read = state["shards_read"]
        if self.names[: len(read)] != read:
            raise ValueError(
                f"dataloader state was saved over other shards (it read {read[0]} … {read[-1]}, {len(read)} "
                "in all): resume over the same shards in the same order"
            )
        for name in (
            "epoch",
            "shard_pos",
            "group",
            "row_pos",
            "arrivals",
            "tokens_consumed",
            "tokens_cropped",
        ):
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
