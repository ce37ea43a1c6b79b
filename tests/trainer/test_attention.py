"""Sliding-window, grouped-query attention equals a naive reference, on every backend present."""

import math

import pytest
import torch

from trainer import attention as attention_module
from trainer.attention import attention


def naive_attention(q, k, v, window: int) -> torch.Tensor:
    """Loops and an explicit softmax: query i (at position Tk − Tq + i) sees keys [pos − window, pos]."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.size(1), k.size(2)
    out = torch.zeros_like(q, dtype=torch.float32)
    for b in range(B):
        for h in range(H):
            kv = h // (H // Hkv)
            for i in range(Tq):
                pos = Tk - Tq + i
                keys = range(max(0, pos - window), pos + 1)
                scores = torch.stack([q[b, i, h].float() @ k[b, j, kv].float() / math.sqrt(D) for j in keys])
                weights = torch.softmax(scores, dim=0)
                out[b, i, h] = sum(w * v[b, j, kv].float() for w, j in zip(weights, keys, strict=True))
    return out


@pytest.mark.parametrize(
    ("q_len", "k_len", "heads", "kv_heads", "window"),
    [
        (16, 16, 4, 4, 16),
        (16, 16, 4, 4, 15),
        (16, 16, 4, 4, 14),
        (16, 16, 4, 4, 5),
        (16, 16, 4, 2, 5),
        (16, 16, 4, 1, 100),
        (3, 20, 4, 2, 7),
        (1, 20, 2, 1, 4),
    ],
)
def test_sdpa_path_matches_naive_reference(q_len, k_len, heads, kv_heads, window) -> None:
    torch.manual_seed(0)
    q = torch.randn(2, q_len, heads, 8)
    k, v = torch.randn(2, k_len, kv_heads, 8), torch.randn(2, k_len, kv_heads, 8)
    assert not attention_module.uses_flash(q)
    assert torch.allclose(attention(q, k, v, window), naive_attention(q, k, v, window), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(attention_module.FLASH_ATTN is None, reason="flash-attn is not installed")
@pytest.mark.parametrize(
    ("q_len", "k_len", "kv_heads", "window"), [(64, 64, 4, 64), (64, 64, 2, 17), (5, 64, 2, 17)]
)
def test_flash_path_matches_naive_reference(q_len, k_len, kv_heads, window) -> None:
    torch.manual_seed(0)
    q = torch.randn(1, q_len, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, k_len, kv_heads, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, k_len, kv_heads, 64, device="cuda", dtype=torch.bfloat16)
    assert attention_module.uses_flash(q)
    expected = naive_attention(q.cpu(), k.cpu(), v.cpu(), window)
    assert torch.allclose(attention(q, k, v, window).float().cpu(), expected, atol=2e-2)
