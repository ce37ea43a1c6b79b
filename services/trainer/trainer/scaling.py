"""
One dial: --depth sets the model's shape, and from it a compute-optimal training horizon, batch size,
learning rates and weight decay (nanochat's recipe, ../shared/RECIPE.md). Every derived value can be
overridden by its own flag; the training program prints them all at start.

- width = aspect_ratio·depth rounded up to the head dim; heads = width / head_dim;
- tokens D = ratio × N, with N = transformer matrices + lm_head (ratio ~10.5 is compute-optimal);
- batch B = 2^round(log2(B_ref·(D/D_ref)^0.383)), Power Lines' optimal batch growth (B_ref = 2^19
  tokens at the reference d12);
- every learning rate × √(B/B_ref); Muon weight decay λ = 0.28·√(B/B_ref)·(D_ref/D).
"""

import math
from dataclasses import dataclass
from typing import Any

import torch

from trainer.gpt import GPT, GPTConfig

REFERENCE_BATCH = 2**19  # tokens per step at the reference depth
REFERENCE_DEPTH = 12
BATCH_EXPONENT = 0.383  # Power Lines: B_opt ∝ D^0.383
BASE_WEIGHT_DECAY = 0.28


def model_config(
    depth: int,
    vocab_size: int,
    sequence_len: int,
    head_dim: int = 128,
    aspect_ratio: int = 64,
    n_kv_head: int | None = None,
    **architecture: Any,
) -> GPTConfig:
    """The model of a depth; `architecture` passes GPTConfig switches through (window_pattern, smear, ...)."""
    width = -(-aspect_ratio * depth // head_dim) * head_dim
    heads = width // head_dim
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=heads,
        n_kv_head=n_kv_head or heads,
        n_embd=width,
        **architecture,
    )


def scaling_params(config: GPTConfig) -> int:
    """N without allocating the model (built on the meta device)."""
    with torch.device("meta"):
        return GPT(config).num_scaling_params()


REFERENCE_PARAMS = scaling_params(model_config(REFERENCE_DEPTH, vocab_size=32768, sequence_len=2048))


@dataclass
class Horizon:
    tokens: int  # D
    total_batch_size: int  # B, tokens per optimizer step
    num_iterations: int
    lr_scale: float  # √(B/B_ref)
    weight_decay: float  # Muon's λ before its cosine schedule


def optimal_batch_size(tokens: float, ratio: float) -> int:
    reference_tokens = ratio * REFERENCE_PARAMS
    return 2 ** round(math.log2(REFERENCE_BATCH * (tokens / reference_tokens) ** BATCH_EXPONENT))


def horizon(
    num_params: int, ratio: float, total_batch_size: int | None = None, num_iterations: int | None = None
) -> Horizon:
    """The training horizon for a model of num_params scaling params; explicit batch/steps win."""
    planned_tokens = ratio * num_params
    batch = total_batch_size or optimal_batch_size(planned_tokens, ratio)
    steps = num_iterations or max(1, round(planned_tokens / batch))
    tokens = steps * batch
    lr_scale = math.sqrt(batch / REFERENCE_BATCH)
    weight_decay = BASE_WEIGHT_DECAY * lr_scale * (ratio * REFERENCE_PARAMS) / tokens
    return Horizon(tokens, batch, steps, lr_scale, weight_decay)


# -- schedules (step counts from 0; `total` = num_iterations) -------------------------------


def lr_multiplier(
    step: int, total: int, warmup: int = 40, warmdown_ratio: float = 0.65, final: float = 0.05
) -> float:
    """Linear warm-up, constant, then linear warm-down over the last 65% of steps to 5% of the peak."""
    warmdown_start = total - round(warmdown_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if step < warmdown_start:
        return 1.0
    progress = (step - warmdown_start) / max(1, total - warmdown_start)
    return 1.0 + (final - 1.0) * progress


def muon_momentum(step: int, total: int, warmdown_ratio: float = 0.65) -> float:
    """0.85 → 0.97 over the first 400 steps, then 0.97 → 0.90 during the warm-down."""
    warmdown_start = total - round(warmdown_ratio * total)
    if step >= warmdown_start:
        return 0.97 - 0.07 * (step - warmdown_start) / max(1, total - warmdown_start)
    return 0.85 + 0.12 * min(1.0, step / 400)


def weight_decay_multiplier(step: int, total: int) -> float:
    """Cosine from 1 to 0 over the run."""
    return 0.5 * (1 + math.cos(math.pi * step / total))
