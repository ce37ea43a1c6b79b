"""
Paged KV cache (as vLLM's PagedAttention): the keys and values of the running batch live in one pool of
fixed-size blocks of BLOCK_TOKENS positions, and each row holds a table of the blocks it uses, in order.
A row takes a block only when it reaches it, and gives its blocks back when it finishes, so memory
follows the tokens actually held: a long row does not reserve its length for every other row, as a
contiguous batch cache must.

For the forward pass it is a KV cache like engine.KVCache (start, store, advance, the smear state):
each layer writes the step's keys and values into the rows' blocks, then attends over its rows'
blocks gathered in order (block 0 is a zero block that pads the shorter tables; the mask of
cached_attention hides everything past a row's position, so the pads are never seen).

The scheduler decides what the pool holds: a request is admitted when the blocks of its prompt are
free, and when a running row needs a block and none is left, the latest admitted sequence gives its
blocks up and is computed again later (preemption by recompute), so a full pool never runs out of memory.
"""

import copy
import math

import torch

from inference.prefix_cache import BLOCK_TOKENS
from trainer.engine import KVCache
from trainer.gpt import GPT


class OutOfBlocks(Exception):
    """The pool has fewer free blocks than asked for; nothing was taken."""


def blocks_for(positions: int) -> int:
    return math.ceil(positions / BLOCK_TOKENS)


class PagedKVCache:
    def __init__(self, model: GPT, max_rows: int, num_blocks: int) -> None:
        c = model.config
        shape = (c.n_layer, num_blocks + 1, BLOCK_TOKENS, c.n_kv_head, c.head_dim)  # + the zero block
        device, dtype = model.wte.weight.device, model.compute_dtype
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks, 0, -1))  # popped from the end: the lowest ids first
        self.tables: list[list[int]] = [[] for _ in range(max_rows)]
        self.lengths = [0] * max_rows  # on the host: the scheduler reads them every step, no device sync
        self.last_embedding = torch.zeros(max_rows, 1, c.n_embd, device=device, dtype=dtype)
        self.rows = max_rows  # the forward runs over the first `rows` rows (see head)
        self.positions = torch.zeros(max_rows, 0, dtype=torch.long, device=device)  # of this forward
        self.table = torch.zeros(max_rows, 0, dtype=torch.long, device=device)
        self.end = 0

    # -- the scheduler's side ----------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        return len(self.free)

    def reserve(self, row: int, positions: int) -> None:
        """Blocks for the row's first `positions` positions (OutOfBlocks, taking none, when short)."""
        missing = blocks_for(positions) - len(self.tables[row])
        if missing > len(self.free):
            raise OutOfBlocks(f"{missing} blocks needed, {len(self.free)} free")
        for _ in range(missing):
            self.tables[row].append(self.free.pop())

    def release(self, row: int) -> None:
        """The row's blocks back to the pool; the row is empty."""
        self.free.extend(reversed(self.tables[row]))
        self.tables[row] = []
        self.lengths[row] = 0

    def move_row(self, source: int, target: int) -> None:
        """Row `target` takes over row `source` (its blocks and state; no KV is copied)."""
        self.tables[target], self.tables[source] = self.tables[source], []
        self.lengths[target], self.lengths[source] = self.lengths[source], 0
        self.last_embedding[target] = self.last_embedding[source]

    def copy_rows(self, source: KVCache, source_row: int, rows: list[int]) -> None:
        """Make each of `rows` (empty) continue from row `source_row` of a contiguous cache (a prefill):
        blocks for its length (OutOfBlocks, taking none, when short), filled with its keys and values."""
        length = int(source.lengths[source_row])
        if len(rows) * blocks_for(length) > len(self.free):
            raise OutOfBlocks(f"{len(rows) * blocks_for(length)} blocks needed, {len(self.free)} free")
        padded = blocks_for(length) * BLOCK_TOKENS
        keys, values = (
            torch.nn.functional.pad(t[:, source_row, :length], (0, 0, 0, 0, 0, padded - length)).unflatten(
                1, (-1, BLOCK_TOKENS)
            )
            for t in (source.keys, source.values)
        )
        for row in rows:
            self.reserve(row, length)
            index = torch.tensor(self.tables[row], device=self.keys.device)
            self.keys[:, index], self.values[:, index] = keys, values
            self.lengths[row] = length
            self.last_embedding[row] = source.last_embedding[source_row]

    def row_kv(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's (length, kv_heads, head_dim) keys and values of one row, in order."""
        length, index = self.lengths[row], torch.tensor(self.tables[row], device=self.keys.device)
        return tuple(t[:, index].flatten(1, 2)[:, :length] for t in (self.keys, self.values))

    def head(self, num_rows: int) -> "PagedKVCache":
        """The first num_rows rows, for a forward pass (sharing this cache's pool and state)."""
        view = copy.copy(self)
        view.rows = num_rows
        return view

    # -- the forward pass's side (GPT.forward) -------------------------------------------

    def start(self, num_tokens: int) -> torch.Tensor:
        """Positions (rows, T) of the tokens a forward pass adds after each row's length; every row
        must hold blocks for them (reserve)."""
        lengths, tables, device = self.lengths[: self.rows], self.tables[: self.rows], self.keys.device
        assert all(len(t) * BLOCK_TOKENS >= n + num_tokens for t, n in zip(tables, lengths, strict=True))
        self.positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(
            num_tokens, device=device
        )
        self.end = max(lengths) + num_tokens
        width = blocks_for(self.end)
        padded = [t + [0] * (width - len(t)) for t in tables]  # block 0: zeros, past every row's end
        self.table = torch.tensor(padded, device=device)
        return self.positions

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values into the rows' blocks; return every row's first `end`
        positions, its blocks gathered in order."""
        blocks = self.table.gather(1, self.positions // BLOCK_TOKENS)
        slots = self.positions % BLOCK_TOKENS
        self.keys[layer, blocks, slots] = k
        self.values[layer, blocks, slots] = v
        gathered = (t[layer, self.table].flatten(1, 2)[:, : self.end] for t in (self.keys, self.values))
        return tuple(gathered)

    def advance(self) -> None:
        for row in range(self.rows):
            self.lengths[row] += self.positions.size(1)

    def swap_last_embedding(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Store each row's newest token embedding; return the previous ones (the smear's input)."""
        previous = self.last_embedding[: self.rows].clone()
        self.last_embedding[: self.rows] = embeddings[:, -1:]
        return previous
