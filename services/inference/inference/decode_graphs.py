"""
CUDA graphs for decode steps (INFERENCE_CUDA_GRAPHS). A decode step launches a few hundred small
kernels, and at serving's small batches a GPU waits on the launches longer than it computes: a CUDA
graph records the step's kernels once and replays them all with one launch. A graph replays fixed
shapes at fixed addresses, so the step runs over fixed buffers:
- the batch is padded to the next captured size (1, 2, 4, ... and the largest batch); a padding row
  feeds token 0 at position 0 and writes into the paged cache's pad block;
- every row's keys are gathered to a width in blocks rounded up to a power of two (at most the
  context's); the extra width is pad block, which the mask hides.
One graph per (batch size, width), captured the first time that pair is needed, all in one memory pool
(they never run at once). A row's logits are the eager step's but for rounding (the matmuls have other
shapes), and greedy tokens the same (tests/inference/test_decode_graphs.py). Off CUDA the same
fixed-shape step runs without capture: that is how the tests check it on a CPU. A step whose graph
cannot be recorded raises CaptureFailed, and the scheduler decodes that model eagerly from then on.
"""

import torch

from inference.paged_cache import PagedKVCache, blocks_for
from inference.prefix_cache import BLOCK_TOKENS
from trainer.gpt import GPT

WARMUP_STEPS = 2  # eager runs before a capture (cuBLAS and the allocator settle)


class CaptureFailed(Exception):
    """A fixed-shape step could not be set up (a kernel that a graph cannot record, say); nothing the
    running rows hold has changed."""


class Capture:
    """What every graph of one model shares: its GPU, a memory pool (they never run at once), the
    stream they are recorded on, and the buffer they write their logits into."""

    def __init__(self, device: torch.device, max_rows: int, vocab_size: int) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)
        self.logits = torch.zeros(max_rows, vocab_size, device=device)


def sizes_up_to(largest: int) -> list[int]:
    """1, 2, 4, ... below `largest`, then `largest`."""
    return [*(1 << i for i in range(largest.bit_length()) if 1 << i < largest), largest]


class FixedStep:
    """The decode step at one (batch size, width): its buffers, and its CUDA graph when captured."""

    def __init__(
        self, model: GPT, cache: PagedKVCache, rows: int, width: int, capture: Capture | None
    ) -> None:
        self.model, self.cache, self.width = model, cache, width
        self.view = cache.fixed_view(rows, width)  # its buffers start as padding: position 0, block 0
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=cache.keys.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture is not None:
            self.record(capture)

    def forward(self) -> torch.Tensor:
        return self.model(self.tokens, kv_cache=self.view)[:, -1]

    def record(self, capture: Capture) -> None:
        # The warm-up runs compute for real, on padding alone: they write only into the pad block, and
        # the smear state they overwrite is put back (the capture itself computes nothing). They run on
        # the stream the capture records on, so that cuBLAS has set itself up for that stream before.
        with torch.cuda.device(capture.device):  # the scheduler's thread may have another current GPU
            current = torch.cuda.current_stream()
            smear_state = self.cache.last_embedding.clone()
            capture.stream.wait_stream(current)
            try:
                with torch.cuda.stream(capture.stream):
                    for _ in range(WARMUP_STEPS):
                        self.forward()
                capture.stream.synchronize()
                self.graph = torch.cuda.CUDAGraph()
                # thread_local: the event loop's thread may ask the driver things meanwhile (memory use)
                with torch.cuda.graph(
                    self.graph, pool=capture.pool, stream=capture.stream, capture_error_mode="thread_local"
                ):
                    capture.logits[: self.view.rows].copy_(self.forward())
            finally:
                # A capture that fails in its end leaves the graph's stream current: not for the rest.
                torch.cuda.set_stream(current)
                current.wait_stream(capture.stream)  # a warm-up that failed may have left work queued
                self.cache.last_embedding.copy_(smear_state)
        self.logits = capture.logits

    def run(self, tokens: list[int]) -> torch.Tensor:
        """Next-token logits of the first len(tokens) rows, each fed its token."""
        rows, padding = len(tokens), self.view.rows - len(tokens)
        positions, written, read = self.cache.plan(rows, 1, self.width, padding)
        self.view.positions.copy_(positions)
        self.view.written.copy_(written.flatten())
        self.view.read.copy_(read.flatten())
        self.tokens.copy_(torch.tensor(tokens + [0] * padding)[:, None])
        if self.graph is None:
            return self.forward()[:rows]
        self.graph.replay()
        return self.logits[:rows].clone()  # the next replay overwrites the buffer


class DecodeGraphs:
    """A scheduler's decode steps through fixed-shape steps (captured as CUDA graphs on a GPU)."""

    def __init__(self, model: GPT, cache: PagedKVCache, max_rows: int) -> None:
        self.model, self.cache = model, cache
        self.batch_sizes = sizes_up_to(max_rows)
        # Up to the context's width, or longer for a row that grew past it (as far as rotary goes).
        self.widths = sizes_up_to(blocks_for(model.rotary_len))
        self.capture = (  # None: the steps run uncaptured (off CUDA)
            Capture(cache.keys.device, max_rows, model.config.vocab_size) if cache.keys.is_cuda else None
        )
        self.steps: dict[tuple[int, int], FixedStep] = {}

    def __call__(self, tokens: list[int]) -> torch.Tensor:
        """Next-token logits of the first len(tokens) running rows, each fed its token (every row holds
        a block for it); their lengths advance by one. CaptureFailed when a new step's graph cannot
        be recorded."""
        rows, lengths, tables = len(tokens), self.cache.lengths, self.cache.tables
        assert all(len(tables[row]) * BLOCK_TOKENS > lengths[row] for row in range(rows))
        needed = blocks_for(max(lengths[:rows]) + 1)
        key = (
            next(size for size in self.batch_sizes if size >= rows),
            next(width for width in self.widths if width >= needed),
        )
        if key not in self.steps:
            try:
                self.steps[key] = FixedStep(self.model, self.cache, *key, self.capture)
            except Exception as error:
                raise CaptureFailed(f"batch {key[0]}, {key[1]} blocks: {error}") from error
        logits = self.steps[key].run(tokens)
        for row in range(rows):
            lengths[row] += 1
        return logits
