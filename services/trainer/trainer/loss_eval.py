"""
Bits per byte: the model's cross-entropy over the target tokens, in bits, divided by the UTF-8 bytes
those tokens spell. Unlike loss per token it does not depend on the tokenizer, so models with
different vocabularies compare directly. Special tokens (0 bytes) are left out of both sums.
"""

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

from trainer.runtime import StopRequest, end_if_stopped, until_stopped


@torch.no_grad()
def evaluate_bpb(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    token_bytes: torch.Tensor,
    stop: StopRequest | None = None,
) -> float:
    """bpb over `steps` batches (summed over all processes when distributed); a stop request ends it
    (EvalStopped)."""
    nats = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    num_bytes = torch.zeros((), dtype=torch.float64, device=token_bytes.device)
    for _ in until_stopped(range(steps), stop):
        inputs, targets = next(batches)
        losses = model(inputs, targets, loss_reduction="none").view(-1)
        targets = targets.reshape(-1)
        target_bytes = torch.where(targets >= 0, token_bytes[targets.clamp_min(0)], 0)
        nats += (losses * (target_bytes > 0)).sum(dtype=torch.float64)
        num_bytes += target_bytes.sum(dtype=torch.float64)
    end_if_stopped(stop, token_bytes.device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(nats)
        dist.all_reduce(num_bytes)
    return (nats / (math.log(2) * num_bytes.clamp_min(1))).item()
