"""
Paged KV cache (as vLLM's PagedAttention): the keys and values of the running batch (and of the prompts
being prefilled) live in one pool of fixed-size blocks of BLOCK_TOKENS positions, and each row holds a
table of the blocks it uses, in order. A row takes a block only when it reaches it, and gives its
blocks back when it finishes, so memory
follows the tokens actually held: a long row does not reserve its length for every other row, as a
contiguous batch cache must.

For the forward pass it is a KV cache like engine.KVCache (start, store, advance, the smear state):
each layer writes the step's keys and values into the rows' blocks, then attends over its rows'
blocks gathered in order (block 0 is no row's: it pads the shorter tables, and the padding rows of a
fixed-shape step write into it; the mask of cached_attention hides everything past a row's position,
so the pads are never seen). The pool is stored as one run of slots per layer (block b holds slots
b·16 to b·16+15), and the slots a forward writes and reads are worked out once, in start, for every
layer: a layer costs one index_copy_ and one index_select per tensor.

A prefill computes its prompts in the same pool, on rows of its own (rows_view: its own block tables
and lengths, the pool and its free list shared), and a complete prompt's row joins the batch by handing
its blocks over (take_row), and the prompts being prefilled count against the pool.

A whole block can have several holders, as it is never written again: the rows whose prompts start
with the tokens of a prefix-cache hit (prefix_cache.py), and the n samples of one prompt. A row writes
only into blocks it holds alone, so a block it would continue (a hit's used in part, a prompt's partial
last one for its other samples) is copied first. A block no row holds is free, or, while the prefix
cache names it, kept for the next prompt that starts with its tokens, until a row needs a block and
none is free (the least recently given back goes first).

The scheduler decides what the pool holds: a request is admitted when the blocks of its prompt are
free (the prefill takes them at once), and when a running row needs a block and none is left, the
latest admitted holder gives its blocks up and is computed again later (preemption by recompute), so a
full pool never runs out of memory.
"""

import copy
import math
from collections import OrderedDict

import torch

from inference.prefix_cache import BLOCK_TOKENS, Hit, PrefixCache
from trainer.gpt import GPT


class OutOfBlocks(Exception):
    """The pool has fewer free blocks than asked for; nothing was taken."""


def blocks_for(positions: int) -> int:
    return math.ceil(positions / BLOCK_TOKENS)


def block_slots(blocks: torch.Tensor) -> torch.Tensor:
    """The pool slots of blocks (..., W), in order: (..., W·BLOCK_TOKENS)."""
    return (blocks[..., None] * BLOCK_TOKENS + torch.arange(BLOCK_TOKENS, device=blocks.device)).flatten(-2)


class PagedKVCache:
    def __init__(self, model: GPT, max_rows: int, num_blocks: int, prefix_tokens: int = 0) -> None:
        c = model.config
        shape = (c.n_layer, (num_blocks + 1) * BLOCK_TOKENS, c.n_kv_head, c.head_dim)  # + the pad block
        device, dtype = model.wte.weight.device, model.compute_dtype
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks, 0, -1))  # unnamed, unheld: popped from the end, lowest ids first
        self.holders = [0] * (num_blocks + 1)  # rows holding each block (several: a shared whole block)
        self.prefix = PrefixCache(prefix_tokens)  # names blocks by the tokens they hold
        self.kept: OrderedDict[int, None] = OrderedDict()  # named blocks no row holds, least recent first
        self.tables: list[list[int]] = [[] for _ in range(max_rows)]
        self.lengths = [0] * max_rows  # on the host: the scheduler reads them every step, no device sync
        self.last_embedding = torch.zeros(max_rows, 1, c.n_embd, device=device, dtype=dtype)
        self.rows = max_rows  # the forward runs over the first `rows` rows (see head)
        self.positions = torch.zeros(max_rows, 0, dtype=torch.long, device=device)  # of this forward
        self.written = torch.zeros(0, dtype=torch.long, device=device)  # its new tokens' slots
        self.read = torch.zeros(0, dtype=torch.long, device=device)  # every row's first `end` slots
        self.end = 0
        self.real_counts: list[int] | None = None  # of the next forward, when its rows are padded
        self.fixed = False  # a fixed_view: start and advance leave its buffers and lengths alone
        # On the CPU, a layer's keys and values are gathered into buffers kept from one forward to the
        # next (the views share them): a fresh tensor of that size comes from the OS every time, and
        # its page faults cost as much as the gather itself. CUDA's caching allocator reuses memory.
        self.gather_buffers: dict[str, torch.Tensor] | None = {} if device.type == "cpu" else None
        # what one layer's gather reads at the most: every row as long as the longest a row can be
        self.most_gathered = max_rows * min(num_blocks, blocks_for(c.sequence_len)) * BLOCK_TOKENS

    # -- the scheduler's side ----------------------------------------------------------

    @property
    def free_blocks(self) -> int:
        """Blocks a row can take: the unheld ones, named blocks kept for the prefix cache included."""
        return len(self.free) + len(self.kept)

    @property
    def capacity(self) -> int:
        """Positions the pool holds: the most one sequence can grow to."""
        return self.num_blocks * BLOCK_TOKENS

    def take(self, count: int) -> list[int]:
        """`count` blocks for one holder each (OutOfBlocks, taking none, when short): free ones first,
        then the least recently given back of those the prefix cache keeps, unnamed."""
        if count > self.free_blocks:
            raise OutOfBlocks(f"{count} blocks needed, {self.free_blocks} free")
        taken = [self.free.pop() if self.free else self.unkeep() for _ in range(count)]
        for block in taken:
            self.holders[block] = 1
        return taken

    def share(self, blocks: list[int]) -> None:
        """One more holder for each block (a prefix hit's, or a prompt's whole blocks for its n samples)."""
        for block in blocks:
            self.holders[block] += 1
            self.kept.pop(block, None)

    def give_back(self, blocks: list[int]) -> None:
        """One holder fewer for each block; a block no one holds is free again, or kept while named (the
        last of a row's blocks first in line to go: a parent outlasts its children)."""
        for block in reversed(blocks):
            self.holders[block] -= 1
            if self.holders[block]:
                continue
            if block in self.prefix.by_block:
                self.kept[block] = None
            else:
                self.free.append(block)
        while len(self.kept) > self.prefix.max_blocks:
            self.free.append(self.unkeep())

    def unkeep(self) -> int:
        """The least recently given back of the kept blocks, unnamed."""
        block, _ = self.kept.popitem(last=False)
        return self.prefix.forget(block)

    def name_row(self, row: int, tokens: list[int]) -> None:
        """Name the row's blocks by the tokens they hold (its first lengths[row], `tokens`), so that the
        prefix cache keeps them once given back."""
        if not self.prefix.max_blocks:
            return
        for block in self.prefix.name_blocks(tokens[: self.lengths[row]], self.tables[row]):
            if not self.holders[block]:  # kept for its tokens, which a named block now holds
                del self.kept[block]
                self.free.append(block)

    def reserve(self, row: int, positions: int) -> None:
        """Blocks for the row's first `positions` positions (OutOfBlocks, taking none, when short)."""
        self.tables[row] += self.take(max(0, blocks_for(positions) - len(self.tables[row])))

    def release(self, row: int) -> None:
        """The row's blocks back to the pool; the row is empty."""
        self.give_back(self.tables[row])
        self.tables[row] = []
        self.lengths[row] = 0

    def move_row(self, source: int, target: int) -> None:
        """Row `target` takes over row `source` (its blocks and state; no KV is copied)."""
        self.tables[target], self.tables[source] = self.tables[source], []
        self.lengths[target], self.lengths[source] = self.lengths[source], 0
        self.last_embedding[target] = self.last_embedding[source]

    def rows_view(self, rows: int) -> "PagedKVCache":
        """`rows` empty rows of their own on this pool (a prefill's): own block tables, lengths and
        smear state; the pool's keys, values and free list shared."""
        view = copy.copy(self)
        view.tables, view.lengths, view.rows = [[] for _ in range(rows)], [0] * rows, rows
        view.last_embedding = self.last_embedding.new_zeros(rows, *self.last_embedding.shape[1:])
        return view

    def take_row(self, source: "PagedKVCache", source_row: int, rows: list[int], spare: list[int]) -> None:
        """Make `rows` (empty) continue from row source_row of a view on this pool (rows_view): the first
        takes its blocks over, each other shares its whole blocks and gets a copy of its partial last
        one, in a block taken from `spare`. A failure midway leaves every block with its holders."""
        length, blocks = source.lengths[source_row], source.tables[source_row]
        whole = length // BLOCK_TOKENS
        for row in rows[1:]:
            table = blocks[:whole]
            if length % BLOCK_TOKENS:
                self.copy_block(blocks[whole], spare[-1])
                table = [*table, spare.pop()]
            self.share(blocks[:whole])
            self.hold(row, table, length, source.last_embedding[source_row])
        source.tables[source_row], source.lengths[source_row] = [], 0
        self.hold(rows[0], blocks, length, source.last_embedding[source_row])

    def hold(self, row: int, table: list[int], length: int, last_embedding: torch.Tensor) -> None:
        self.release(row)  # a row left over from a failed step holds nothing now
        self.tables[row], self.lengths[row] = table, length
        self.last_embedding[row] = last_embedding

    def start_from(self, row: int, hit: Hit) -> None:
        """The (empty) row starts with a prefix-cache hit: it shares the hit's blocks."""
        self.share(hit.blocks)
        self.tables[row], self.lengths[row] = list(hit.blocks), hit.length

    def own_last_block(self, row: int) -> None:
        """Give the row a block of its own to write the rest of its last one (a hit's, used in part)
        into: a copy, or, when no block is free and no other row holds it, that block itself, unnamed (a
        sequence that fills the whole pool comes back from its kept blocks)."""
        shared = self.tables[row][-1]
        if not self.free_blocks and self.holders[shared] == 1:
            self.prefix.forget(shared)
            return
        self.tables[row][-1:] = self.take(1)
        try:
            self.copy_block(shared, self.tables[row][-1])
        finally:
            self.give_back([shared])

    def copy_block(self, source: int, target: int) -> None:
        source_slots = slice(source * BLOCK_TOKENS, (source + 1) * BLOCK_TOKENS)
        target_slots = slice(target * BLOCK_TOKENS, (target + 1) * BLOCK_TOKENS)
        self.keys[:, target_slots] = self.keys[:, source_slots]
        self.values[:, target_slots] = self.values[:, source_slots]

    def head(self, num_rows: int) -> "PagedKVCache":
        """The first num_rows rows, for a forward pass (sharing this cache's pool and state)."""
        view = copy.copy(self)
        view.rows = num_rows
        return view

    # -- the forward pass's side (GPT.forward) -------------------------------------------

    def start(self, num_tokens: int) -> torch.Tensor:
        """Positions (rows, T) of the tokens a forward pass adds after each row's length; every row
        must hold blocks for them (reserve), for its real ones when the rows are padded (pad_next:
        pads past a row's blocks go to the pad block). A fixed view's are already in its buffers."""
        if self.fixed:
            return self.positions
        lengths, tables = self.lengths[: self.rows], self.tables[: self.rows]
        counts = self.real_counts or [num_tokens] * self.rows
        assert all(len(t) * BLOCK_TOKENS >= n + c for t, n, c in zip(tables, lengths, counts, strict=True))
        self.end = max(lengths) + num_tokens
        self.positions, written, read = self.plan(self.rows, num_tokens, blocks_for(self.end))
        self.written = written.flatten()
        self.read = read[:, : self.end].flatten()
        return self.positions

    def pad_next(self, real_counts: list[int]) -> None:
        """The next forward's rows are padded at the end: only row i's first real_counts[i] tokens
        count. The pads land past the row's length (in its last block, or the pad block), where no
        query sees them before the row's next tokens overwrite them."""
        self.real_counts = real_counts

    def plan(
        self, rows: int, num_tokens: int, width: int, padding: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a forward adding num_tokens to each of the first `rows` rows, and `padding` empty rows
        after them (position 0, block 0): positions (rows + padding, T), the slots they write (same
        shape), and each row's first `width` blocks of slots to read (rows + padding, width·16)."""
        device = self.keys.device
        lengths = self.lengths[:rows] + [0] * padding
        # A prefill's rows hold their whole prompts' blocks: only the first `width` are read yet.
        tables = [t[:width] + [0] * (width - len(t)) for t in self.tables[:rows]] + [[0] * width] * padding
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
        for name, pool, new in (("keys", self.keys[layer], k), ("values", self.values[layer], v)):
            pool.index_copy_(0, self.written, new.flatten(0, 1))
            gathered.append(self.gather(name, pool).view(shape))
        return gathered[0], gathered[1]

    def gather(self, name: str, pool: torch.Tensor) -> torch.Tensor:
        """The slots `read` of a layer's pool, in order; on the CPU into the buffer `name`, which the
        next layer overwrites (a layer's attention is done with its keys and values by then). Buffers
        are inference tensors: a forward outside inference mode (none of the server's) gets fresh ones."""
        slots = self.read.numel()
        if self.gather_buffers is None or not torch.is_inference_mode_enabled() or slots > self.most_gathered:
            return pool.index_select(0, self.read)  # (past the most: a prefill padded to a cached row)
        buffer = self.gather_buffers.get(name)
        if buffer is None or buffer.size(0) < slots:  # rows grow a slot a step: room for many steps
            room = slots if buffer is None else max(slots, min(3 * buffer.size(0) // 2, self.most_gathered))
            buffer = self.gather_buffers[name] = pool.new_empty((room, *pool.shape[1:]))
        return torch.index_select(pool, 0, self.read, out=buffer[:slots])

    def drop_gather_buffers(self) -> None:
        """Give the gather buffers' memory back (while the scheduler has nothing to run)."""
        if self.gather_buffers is not None:
            self.gather_buffers.clear()

    def advance(self) -> None:
        if self.fixed:
            return
        counts = self.real_counts or [self.positions.size(1)] * self.rows
        for row, count in enumerate(counts):
            self.lengths[row] += count
        self.real_counts = None

    def swap_last_embedding(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Store each row's newest (real) token embedding; return the previous ones (the smear's input).
        A padded row with no real token left gets a pad's: it is complete, and never read again."""
        previous = self.last_embedding[: self.rows].clone()
        if self.real_counts is None:
            self.last_embedding[: self.rows] = embeddings[:, -1:]
        else:
            last = torch.tensor([max(count, 1) - 1 for count in self.real_counts], device=embeddings.device)
            rows = torch.arange(self.rows, device=embeddings.device)
            self.last_embedding[: self.rows] = embeddings[rows, last][:, None]
        return previous
