"""
Prefill: the prompts of a group of submissions computed together on rows of their own in the paged
pool, each row starting where the prefix cache leaves off and padded at the end to the longest, a chunk
of columns per forward. The scheduler runs one chunk per step between decode steps, so a long prompt
delays the running sequences by one chunk's forward at a time rather than by its whole prefill (chunked
prefill, as in Sarathi and vLLM); a row whose prompt is complete joins the batch at once, its blocks
handed over.

The blocks of every prompt (past the whole ones of its prefix-cache hit, which it shares, and one for
each of its n − 1 other samples' copy of its partial last block) are taken when the prefill starts, so
a prefill under way holds what its rows will join with, and counts against the pool like the running
rows.
"""

from dataclasses import dataclass, field

import torch

from inference.paged_cache import PagedKVCache
from inference.prefix_cache import BLOCK_TOKENS, Hit
from trainer.gpt import GPT


@dataclass
class Ready:
    """A prompt computed to its end: the logits of its last position, or of every position it computed
    when the prompt is to be scored."""

    row: int
    logits: torch.Tensor  # (positions, vocab)


@dataclass
class Prefill:
    model: GPT
    rests: list[list[int]]  # per row, the prompt tokens to compute (after the prefix cache's part)
    scored: list[bool]  # rows whose every position's logits are wanted
    chunk: int | None  # prompt tokens per forward (None: every prompt whole, in one)
    cache: PagedKVCache  # rows of its own on the pool (rows_view)
    spare: list[list[int]]  # per row, the blocks its n − 1 copies' partial last blocks will take
    done: int = 0  # columns computed
    kept: list[list[torch.Tensor]] = field(default_factory=list)  # per scored row, its chunks' logits

    @classmethod
    def start(
        cls,
        model: GPT,
        pool: PagedKVCache,
        prompts: list[list[int]],
        hits: list[Hit | None],
        scored: list[bool],
        chunk: int | None,
        copies: list[int],
    ) -> "Prefill":
        """A group's prefill, `chunk` tokens per forward (None: all in one), the hits already cached.
        Takes the blocks of every prompt past the whole ones of its hit (shared) and, when its last block
        is partial, one for each of `copies` more rows (n − 1: its other samples, which share its whole
        blocks and copy that one), from the pool (OutOfBlocks when short, everything given back; kept
        blocks it took are no longer named)."""
        starts = [0 if hit is None else hit.length for hit in hits]
        rests = [prompt[start:] for prompt, start in zip(prompts, starts, strict=True)]
        view = pool.rows_view(len(rests))
        prefill = cls(model, rests, scored, chunk, view, [[] for _ in rests], kept=[[] for _ in rests])
        device = model.wte.weight.device
        try:
            for row, hit in enumerate(hits):  # every hit shared first: a take may take kept blocks back
                if hit is not None:
                    prefill.cache.start_from(row, hit)
            for row, (prompt, hit, more) in enumerate(zip(prompts, hits, copies, strict=True)):
                if hit is not None and hit.length % BLOCK_TOKENS:
                    prefill.cache.own_last_block(row)
                prefill.cache.reserve(row, len(prompt))
                prefill.spare[row] = pool.take(more if len(prompt) % BLOCK_TOKENS else 0)
                if hit is not None:
                    # The smear of the first computed token mixes in the last reused one's embedding.
                    last = torch.tensor([[prompt[hit.length - 1]]], device=device)
                    prefill.cache.last_embedding[row] = model.embed(last)[0]
        except BaseException:
            prefill.release()
            raise
        return prefill

    def release(self, row: int | None = None) -> None:
        """Give a row's blocks (every row's, for None) back to the pool, those kept for its copies too."""
        for r in range(len(self.rests)) if row is None else [row]:
            self.cache.release(r)
            self.cache.give_back(self.spare[r])
            self.spare[r] = []

    def drop(self, row: int) -> None:
        """Compute no more of a row (its client has gone): its blocks go back to the pool now."""
        self.rests[row] = self.rests[row][: self.done]
        self.release(row)

    @property
    def finished(self) -> bool:
        return self.done >= max(len(rest) for rest in self.rests)

    def step(self) -> tuple[int, list[Ready]]:
        """Compute the next chunk: the tokens it cost (pads included) and the rows it completed. The
        forward runs over the rows up to the last one not complete (the scheduler puts the longest
        first, so the complete ones drop out), each `chunk` // rows tokens further."""
        rows = 1 + max(row for row, rest in enumerate(self.rests) if len(rest) > self.done)
        columns = max(len(rest) for rest in self.rests) - self.done
        width = columns if self.chunk is None else max(1, min(columns, self.chunk // rows))
        chunks = [rest[self.done : self.done + width] for rest in self.rests[:rows]]
        counts = [len(chunk) for chunk in chunks]
        padded = [chunk + [0] * (width - len(chunk)) for chunk in chunks]
        cache = self.cache.head(rows)
        cache.pad_next(counts)  # a complete row computes only pads, past its end
        logits = self.model(torch.tensor(padded, device=self.model.wte.weight.device), kv_cache=cache)
        ready = []
        for row, (rest, count) in enumerate(zip(self.rests, counts, strict=False)):
            if count == 0:
                continue
            if self.scored[row]:
                self.kept[row].append(logits[row, :count])
            if self.done + count == len(rest):
                last = torch.cat(self.kept[row]) if self.scored[row] else logits[row, count - 1 : count]
                ready.append(Ready(row, last))
        self.done += width
        return rows * width, ready
