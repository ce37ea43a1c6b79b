"""
Sampling with a KV cache: the prompt is run once (prefill), then each new token costs one position of
compute, attending to the keys and values cached for all earlier positions.
"""

from collections.abc import Iterator

import torch

from trainer.gpt import GPT


class KVCache:
    """Keys and values of every layer for max_len positions, and the last token's embedding (for smear)."""

    def __init__(self, model: GPT, batch_size: int, max_len: int) -> None:
        c = model.config
        shape = (c.n_layer, batch_size, max_len, c.n_kv_head, c.head_dim)
        device, dtype = model.wte.weight.device, model.compute_dtype
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.last_embedding: torch.Tensor | None = None

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values after the cached ones; return all of them."""
        end = self.pos + k.size(1)
        assert end <= self.keys.size(2), f"KV cache full: {end} > {self.keys.size(2)} positions"
        self.keys[layer, :, self.pos : end] = k
        self.values[layer, :, self.pos : end] = v
        return self.keys[layer, :, :end], self.values[layer, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.pos += num_tokens


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: list[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 42,
) -> Iterator[int]:
    """Yield up to max_tokens sampled tokens (temperature 0 = greedy), from a seeded generator."""
    device = model.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    cache = KVCache(model, batch_size=1, max_len=len(prompt) + max_tokens)
    logits = model(torch.tensor([prompt], device=device), kv_cache=cache)[:, -1]
    for _ in range(max_tokens):
        token = sample(logits, temperature, top_k, generator)
        yield token
        logits = model(torch.tensor([[token]], device=device), kv_cache=cache)[:, -1]


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax(dim=-1))
    if top_k is not None:
        threshold = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))
