"""
Paged KV cache (as vLLM's PagedAttention): the keys and values of the running batch live in one pool of
fixed-size blocks of BLOCK_TOKENS positions, and each row holds a table of the blocks it uses, in order.
A row takes a block only when it reaches it, and gives its blocks back when it finishes, so memory
follows the tokens actually held: a long row does not reserve its length for every other row, as a
contiguous batch cache must.

For the forward pass it is a KV cache like engine.KVCache (start, store, advance, the smear state):
each layer writes the step's keys and values into the rows' blocks, then attends over its rows'
blocks gathered in order (block 0 is no row's: it pads the shorter tables, and the padding rows of a
fixed-shape step write into it; the mask of cached_attention hides everything past a row's position,
so the pads are never seen). The pool is stored as one run of slots per layer (block b holds slots
b·16 to b·16+15), and the slots a forward writes and reads are worked out once, in start, for every
layer: a layer costs one index_copy_ and one index_select per tensor.

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


def block_slots(blocks: torch.Tensor) -> torch.Tensor:
    """The pool slots of blocks (..., W), in order: (..., W·BLOCK_TOKENS)."""
    return (blocks[..., None] * BLOCK_TOKENS + torch.arange(BLOCK_TOKENS, device=blocks.device)).flatten(-2)


class PagedKVCache:
    def __init__(self, model: GPT, max_rows: int, num_blocks: int) -> None:
        c = model.config
        shape = (c.n_layer, (num_blocks + 1) * BLOCK_TOKENS, c.n_kv_head, c.head_dim)  # + the pad block
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
        self.written = torch.zeros(0, dtype=torch.long, device=device)  # its new tokens' slots
        self.read = torch.zeros(0, dtype=torch.long, device=device)  # every row's first `end` slots
        self.end = 0
        self.fixed = False  # a fixed_view: start and advance leave its buffers and lengths alone

    # -- the scheduler's side ----------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        return len(self.free)

    @property
    def capacity(self) -> int:
        """Positions the pool holds: the most one sequence can grow to."""
        return self.num_blocks * BLOCK_TOKENS

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
        for row in rows:
            self.release(row)  # a row left over from a failed step holds nothing now
            self.reserve(row, length)
            slots = self.slots(self.tables[row], length)
            self.keys.index_copy_(1, slots, source.keys[:, source_row, :length])
            self.values.index_copy_(1, slots, source.values[:, source_row, :length])
            self.lengths[row] = length
            self.last_embedding[row] = source.last_embedding[source_row]

    def row_kv(self, row: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's keys and values of one row from position `start` on, in order:
        (length − start, kv_heads, head_dim)."""
        slots = self.slots(self.tables[row], self.lengths[row])[start:]
        return self.keys.index_select(1, slots), self.values.index_select(1, slots)

    def slots(self, table: list[int], length: int) -> torch.Tensor:
        """The pool slots of a row's first `length` positions."""
        return block_slots(torch.tensor(table, device=self.keys.device))[:length]

    def head(self, num_rows: int) -> "PagedKVCache":
        """The first num_rows rows, for a forward pass (sharing this cache's pool and state)."""
        view = copy.copy(self)
        view.rows = num_rows
        return view

    # -- the forward pass's side (GPT.forward) -------------------------------------------

    def start(self, num_tokens: int) -> torch.Tensor:
        """Positions (rows, T) of the tokens a forward pass adds after each row's length; every row
        must hold blocks for them (reserve). A fixed view's are already in its buffers."""
        if self.fixed:
            return self.positions
        lengths, tables = self.lengths[: self.rows], self.tables[: self.rows]
        assert all(len(t) * BLOCK_TOKENS >= n + num_tokens for t, n in zip(tables, lengths, strict=True))
        self.end = max(lengths) + num_tokens
        self.positions, written, read = self.plan(self.rows, num_tokens, blocks_for(self.end))
        self.written = written.flatten()
        self.read = read[:, : self.end].flatten()
        return self.positions

    def plan(
        self, rows: int, num_tokens: int, width: int, padding: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a forward adding num_tokens to each of the first `rows` rows, and `padding` empty rows
        after them (position 0, block 0): positions (rows + padding, T), the slots they write (same
        shape), and each row's first `width` blocks of slots to read (rows + padding, width·16)."""
        device = self.keys.device
        lengths = self.lengths[:rows] + [0] * padding
        tables = [t + [0] * (width - len(t)) for t in self.tables[:rows]] + [[0] * width] * padding
        positions = torch.tensor(lengths, device=device)[:, None] + torch.arange(num_tokens, device=device)
        slots = block_slots(torch.tensor(tables, device=device))  # block 0 pads: past every row's end
        return positions, slots.gather(1, positions), slots

    def fixed_view(self, rows: int, width: int) -> "PagedKVCache":
        """A view for a forward of fixed shapes (decode_graphs.py): one token for each of `rows` rows,
        keys gathered to `width` blocks, positions and slots in buffers that its owner fills (plan)
        before each forward, and lengths that its owner advances."""
        view = self.head(rows)
        device = self.keys.device
        view.fixed, view.end = True, width * BLOCK_TOKENS
        view.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        view.written = torch.zeros(rows, dtype=torch.long, device=device)
        view.read = torch.zeros(rows * view.end, dtype=torch.long, device=device)
        return view

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values into the rows' blocks; return every row's first `end`
        positions, its blocks gathered in order."""
        shape = (k.size(0), self.end, *k.shape[2:])
        gathered = []
        for pool, new in ((self.keys[layer], k), (self.values[layer], v)):
            pool.index_copy_(0, self.written, new.flatten(0, 1))
            gathered.append(pool.index_select(0, self.read).view(shape))
        return gathered[0], gathered[1]

    def advance(self) -> None:
        if self.fixed:
            return
        for row in range(self.rows):
            self.lengths[row] += self.positions.size(1)

    def swap_last_embedding(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Store each row's newest token embedding; return the previous ones (the smear's input)."""
        previous = self.last_embedding[: self.rows].clone()
        self.last_embedding[: self.rows] = embeddings[:, -1:]
        return previous
