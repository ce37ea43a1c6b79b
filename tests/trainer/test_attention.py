"""Sliding-window, grouped-query attention equals a naive reference, on every backend present."""

import math
import os
import sys
import types

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


@pytest.fixture
def gpu_of_capability(monkeypatch: pytest.MonkeyPatch):
    """A CUDA device that reports the given compute capability (no GPU needed: only the choice is tested)."""
    attention_module.backend.cache_clear()
    yield lambda major, minor: monkeypatch.setattr(
        torch.cuda, "get_device_capability", lambda d: (major, minor)
    )
    attention_module.backend.cache_clear()


def fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **attributes) -> None:
    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attributes))


def test_hopper_takes_fa3_from_the_kernel_hub_cached_in_the_base_dir(
    gpu_of_capability, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    gpu_of_capability(9, 0)
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.delenv("KERNELS_CACHE", raising=False)
    asked, fa3 = [], object()

    def get_kernel(repo: str, version: int):
        asked.append((repo, version, os.environ["KERNELS_CACHE"]))
        return types.SimpleNamespace(flash_attn_func=fa3)

    fake_module(monkeypatch, "kernels", get_kernel=get_kernel)
    chosen = attention_module.backend(torch.device("cuda", 0))
    assert (chosen.name, chosen.function) == ("fa3", fa3)
    assert asked == [("kernels-community/flash-attn3", 1, str(tmp_path / "kernels"))]
    assert attention_module.describe(torch.device("cuda", 0), torch.bfloat16) == (
        "fa3 (kernels-community/flash-attn3 v1 via kernels)"
    )


def test_without_fa3_or_fa2_attention_falls_back_to_sdpa_and_says_why(
    gpu_of_capability, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu_of_capability(9, 0)

    def offline(repo: str, version: int):
        raise FileNotFoundError("kernel must already be present in the local cache.\nmore detail")

    fake_module(monkeypatch, "kernels", get_kernel=offline)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import fails: not installed
    chosen = attention_module.backend(torch.device("cuda", 0))
    assert chosen.name == "sdpa" and chosen.function is None
    assert chosen.detail == (
        "FA3 not loaded: kernel must already be present in the local cache.; "
        "FA2 not installed (FLASH_ATTN_WHEEL)"
    )


def test_ampere_takes_the_fa2_wheel_and_older_gpus_sdpa(
    gpu_of_capability, monkeypatch: pytest.MonkeyPatch
) -> None:
    fa2 = object()
    fake_module(monkeypatch, "flash_attn", flash_attn_func=fa2, __version__="2.8.3")
    gpu_of_capability(8, 0)
    assert attention_module.backend(torch.device("cuda", 0)) == attention_module.Backend(
        "fa2", "flash-attn 2.8.3", fa2
    )
    attention_module.backend.cache_clear()
    gpu_of_capability(7, 5)
    assert attention_module.backend(torch.device("cuda", 0)).describe() == (
        "sdpa (flash attention needs SM ≥ 8.0, this GPU is SM 7.5)"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("q_len", "k_len", "kv_heads", "window"), [(64, 64, 4, 64), (64, 64, 2, 17), (5, 64, 2, 17)]
)
def test_flash_path_matches_naive_reference(q_len, k_len, kv_heads, window) -> None:
    torch.manual_seed(0)
    q = torch.randn(1, q_len, 4, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, k_len, kv_heads, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, k_len, kv_heads, 64, device="cuda", dtype=torch.bfloat16)
    if not attention_module.uses_flash(q):
        pytest.skip(f"no flash kernel here: {attention_module.backend(q.device).describe()}")
    expected = naive_attention(q.cpu(), k.cpu(), v.cpu(), window)
    assert torch.allclose(attention(q, k, v, window).float().cpu(), expected, atol=2e-2)
