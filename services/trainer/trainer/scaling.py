"""
One dial: --depth sets the model's shape, and from it a compute-optimal training horizon, batch size,
learning rates and weight decay (nanochat's recipe, ../shared/RECIPE.md). Every derived value can be
overridden by its own flag; the training program prints them all at start.

- width = aspect_ratio·depth rounded up to the head dim; heads = width / head_dim;
- planned tokens D = ratio × N, with N = transformer matrices + lm_head (ratio ~10.5 is
  compute-optimal); D_ref the same for a d12 built like the run's model (only the depth differs);
- batch B = 2^round(log2(B_ref·(D/D_ref)^0.383)), Power Lines' optimal batch growth (B_ref = 2^19
  tokens at the reference d12);
- every learning rate × √(B/B_ref); Muon weight decay λ = 0.28·√(B/B_ref)·(D_ref/D);
- steps: --num-iterations, else a FLOPs budget's round(F / (FLOPs per token · B)), else D // B (the
  reference's order of precedence).
D is the planned horizon: a step count or a FLOPs budget changes how long a run trains, never B or λ.
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
MOMENTUM_WARMUP_STEPS = 400


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


def meta_model(config: GPTConfig) -> GPT:
    """The model's shapes without its memory (built on the meta device), for counting."""
    with torch.device("meta"):
        return GPT(config)


def scaling_params(config: GPTConfig) -> int:
    return meta_model(config).num_scaling_params()


def reference_params(
    vocab_size: int, sequence_len: int, head_dim: int = 128, aspect_ratio: int = 64, **architecture: Any
) -> int:
    """N of the reference d12, built like the run's model (its vocab, head dim, aspect ratio and
    switches): only the depth is 12. Full multi-head attention, as the reference was tuned."""
    config = model_config(REFERENCE_DEPTH, vocab_size, sequence_len, head_dim, aspect_ratio, **architecture)
    return scaling_params(config)


@dataclass
class Horizon:
    planned_tokens: int  # D = ratio × N: B and λ come from it, whatever --num-iterations says
    reference_tokens: float  # D_ref = ratio × N(d12)
    total_batch_size: int  # B, tokens per optimizer step
    num_iterations: int
    lr_scale: float  # √(B/B_ref)
    weight_decay: float  # Muon's λ before its cosine schedule

    @property
    def tokens(self) -> int:
        """Tokens the run trains on (D itself only when the step count is derived from it)."""
        return self.num_iterations * self.total_batch_size


def horizon(
    num_params: int,
    reference_num_params: int,
    ratio: float,
    total_batch_size: int | None = None,
    num_iterations: int | None = None,
    weight_decay_horizon: str = "planned",
    target_flops: float | None = None,
    flops_per_token: int | None = None,
) -> Horizon:
    """The training horizon of a model with num_params scaling params; explicit batch/steps win.

    D is the planned horizon ratio × N: an explicit step count or a FLOPs budget (target_flops, with
    the model's flops_per_token) shortens or lengthens the run but moves neither B nor λ.
    weight_decay_horizon="trained" is our option (not the reference's) to put the tokens actually
    trained in λ's D instead, as T_epoch = B/(η·λ·D) constant asks for a run that stops early
    (https://arxiv.org/abs/2405.13698).
    """
    assert weight_decay_horizon in ("planned", "trained"), f"unknown horizon {weight_decay_horizon!r}"
    planned = int(ratio * num_params)
    reference = ratio * reference_num_params
    optimal_batch = REFERENCE_BATCH * (planned / reference) ** BATCH_EXPONENT  # Power Lines
    batch = total_batch_size or 2 ** round(math.log2(optimal_batch))
    if num_iterations:
        steps = num_iterations
    elif target_flops:
        assert flops_per_token, "a FLOPs budget needs the model's FLOPs per token"
        steps = max(1, round(target_flops / (flops_per_token * batch)))
    else:
        steps = max(1, planned // batch)
    lr_scale = math.sqrt(batch / REFERENCE_BATCH)
    decay_tokens = planned if weight_decay_horizon == "planned" else steps * batch
    weight_decay = BASE_WEIGHT_DECAY * lr_scale * reference / decay_tokens
    return Horizon(planned, reference, batch, steps, lr_scale, weight_decay)


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
    """0.85 → 0.97 over the first 400 steps (this wins, even inside the warm-down), then 0.97 → 0.90
    during the warm-down."""
    if step < MOMENTUM_WARMUP_STEPS:
        return 0.85 + 0.12 * step / MOMENTUM_WARMUP_STEPS
    warmdown_start = total - round(warmdown_ratio * total)
    if step >= warmdown_start:
        return 0.97 - 0.07 * (step - warmdown_start) / max(1, total - warmdown_start)
    return 0.97


def weight_decay_multiplier(step: int, total: int) -> float:
    """Cosine from 1 to 0 over the run."""
    return 0.5 * (1 + math.cos(math.pi * step / total))
