"""
Prefill: the prompts of a group of submissions computed together on a KV cache of their own, each row
starting where the prefix cache leaves off and padded at the end to the longest, a chunk of columns
per forward. The scheduler runs one chunk per step between decode steps, so a long prompt delays the
running sequences by one chunk's forward at a time rather than by its whole prefill (chunked prefill,
as in Sarathi and vLLM); a row whose prompt is complete joins the batch at once.
"""

import math
from dataclasses import dataclass, field

import torch

from inference.prefix_cache import Hit
from trainer.engine import KVCache
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
    width: int  # columns per chunk
    cache: KVCache
    done: int = 0  # columns computed
    kept: list[list[torch.Tensor]] = field(default_factory=list)  # per scored row, its chunks' logits

    @classmethod
    def start(
        cls,
        model: GPT,
        prompts: list[list[int]],
        hits: list[Hit | None],
        scored: list[bool],
        chunk: int | None,
    ) -> "Prefill":
        """A group's prefill, `chunk` tokens per forward (None: all in one), the hits already cached."""
        starts = [0 if hit is None else hit.length for hit in hits]
        rests = [prompt[start:] for prompt, start in zip(prompts, starts, strict=True)]
        longest = max(len(rest) for rest in rests)
        width = longest if chunk is None else max(1, min(longest, chunk // len(rests)))
        # A row that is complete or short gets pads written past its end: room for a whole last chunk.
        cache = KVCache(model, len(rests), max(starts) + math.ceil(longest / width) * width)
        device = model.wte.weight.device
        for row, (prompt, hit) in enumerate(zip(prompts, hits, strict=True)):
            if hit is not None:  # the row continues from the cached keys and values
                hit.copy_to(cache.keys[:, row], cache.values[:, row])
                cache.lengths[row] = hit.length
                # The smear of the first computed token mixes in the last reused one's embedding.
                last = torch.tensor([[prompt[hit.length - 1]]], device=device)
                cache.last_embedding[row] = model.embed(last)[0]
        return cls(model, rests, scored, width, cache, kept=[[] for _ in rests])

    @property
    def finished(self) -> bool:
        return self.done >= max(len(rest) for rest in self.rests)

    def step(self) -> tuple[int, list[Ready]]:
        """Compute the next chunk: the tokens it cost (pads included) and the rows it completed."""
        chunks = [rest[self.done : self.done + self.width] for rest in self.rests]
        counts = [len(chunk) for chunk in chunks]
        width = max(counts)
        padded = [chunk + [0] * (width - len(chunk)) for chunk in chunks]
        self.cache.pad_next(counts)  # a complete row computes only pads, past its end
        logits = self.model(torch.tensor(padded, device=self.model.wte.weight.device), kv_cache=self.cache)
        ready = []
        for row, (rest, count) in enumerate(zip(self.rests, counts, strict=True)):
            if count == 0:
                continue
            if self.scored[row]:
                self.kept[row].append(logits[row, :count])
            if self.done + count == len(rest):
                last = torch.cat(self.kept[row]) if self.scored[row] else logits[row, count - 1 : count]
                ready.append(Ready(row, last))
        self.done += width
        return len(padded) * width, ready
