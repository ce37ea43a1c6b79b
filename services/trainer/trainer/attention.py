"""
Causal (sliding-window) attention behind one function. Flash attention runs it on GPUs for bf16/fp16
tensors: FA3 on Hopper, loaded through Hugging Face's `kernels` package (the kernel is downloaded once
into KERNELS_CACHE, by default the base dir's kernels/ folder: the data volume in Docker, except for the
model server, which mounts that read-only and has a cache volume of its own), FA2
where the flash-attn wheel is installed (SM ≥ 8.0). PyTorch's scaled_dot_product_attention runs it
otherwise (CPU, fp32, older GPUs, no flash kernel), with an explicit mask when a window or a KV cache
needs one. `backend(device)` says which path a device takes, and why.

Shapes: q (B, Tq, heads, head_dim); k, v (B, Tk, kv_heads, head_dim) with Tk ≥ Tq. The queries are
the last Tq positions, or, with a KV cache whose rows hold different lengths, at `query_positions`
(B, Tq): then each row sees its own keys up to its own position (keys past it are stale or empty).
`window` counts the earlier keys a query sees besides its own (flash-attn's left window, as the
reference passes it): window + 1 keys.
"""

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.settings import TrainerSettings

FA3_KERNEL, FA3_VERSION = "kernels-community/flash-attn3", 1  # the Hub kernel and its major version


@dataclass(frozen=True)
class Backend:
    name: str  # "fa3", "fa2" or "sdpa"
    detail: str  # where the kernel came from, or why flash attention is not used
    function: Callable | None = None  # flash_attn_func(q, k, v, causal=..., window_size=(left, right))

    def describe(self) -> str:
        return f"{self.name} ({self.detail})"


def load_fa3() -> Callable:
    """FA3's flash_attn_func from the kernels Hub (downloaded on first use; offline, from the cache)."""
    os.environ.setdefault("KERNELS_CACHE", str(TrainerSettings().base_dir.expanduser() / "kernels"))
    from kernels import get_kernel

    return get_kernel(FA3_KERNEL, version=FA3_VERSION).flash_attn_func


@functools.cache
def backend(device: torch.device) -> Backend:
    """The flash kernel bf16/fp16 attention takes on `device`: FA3 on Hopper (SM 9.x), FA2 on SM ≥ 8.0
    when flash-attn is installed, else SDPA, with the reason."""
    if device.type != "cuda":
        return Backend("sdpa", f"flash attention needs a CUDA GPU, this is {device.type}")
    major, minor = torch.cuda.get_device_capability(device)
    reasons = []
    if major == 9:
        try:
            return Backend("fa3", f"{FA3_KERNEL} v{FA3_VERSION} via kernels", load_fa3())
        except Exception as error:  # offline without a cached copy, no build for this torch, no kernels
            reasons.append(
                f"FA3 not loaded: {(str(error).strip().splitlines() or [type(error).__name__])[0]}"
            )
    if major < 8:
        return Backend("sdpa", f"flash attention needs SM ≥ 8.0, this GPU is SM {major}.{minor}")
    try:
        import flash_attn

        return Backend("fa2", f"flash-attn {flash_attn.__version__}", flash_attn.flash_attn_func)
    except ImportError:
        reasons.append("FA2 not installed (FLASH_ATTN_WHEEL)")
    return Backend("sdpa", "; ".join(reasons))


def describe(device: torch.device, dtype: torch.dtype) -> str:
    """The attention path a run on `device` in `dtype` takes, for its log and report."""
    if dtype not in (torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        return f"sdpa (flash attention needs bf16 or fp16, this run computes in {name})"
    return backend(device).describe()


def uses_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and backend(q.device).function is not None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of each query over its own key and the `window` keys before it."""
    q_len, k_len = q.size(1), k.size(1)
    if query_positions is not None:
        return cached_attention(q, k, v, window, query_positions)
    if uses_flash(q):
        # window_size=(left, right): `left` earlier keys are visible. flash-attn aligns causality
        # bottom-right, which is exactly "queries are the last Tq positions".
        out = backend(q.device).function(q, k, v, causal=True, window_size=(window, 0))
        return out[0] if isinstance(out, tuple) else out  # FA3 also returns the log-sum-exp
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA wants (B, heads, T, D)
    gqa = q.size(1) != k.size(1)
    if q_len == k_len and window >= k_len - 1:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        mask = causal_window_mask(q_len, k_len, window, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def cached_attention(q, k, v, window: int, query_positions: torch.Tensor) -> torch.Tensor:
    """Per-row positions: a (B, 1, Tq, Tk) mask; SDPA on every device (flash-attn has no such mask)."""
    key_pos = torch.arange(k.size(1), device=q.device)
    positions = query_positions[:, None, :, None]
    mask = (key_pos <= positions) & (positions - key_pos <= window)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.size(1) != k.size(1))
    return y.transpose(1, 2)


def causal_window_mask(q_len: int, k_len: int, window: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) booleans, True where query i (at position k_len − q_len + i) may attend key j."""
    query_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    key_pos = torch.arange(k_len, device=device)[None, :]
    return (key_pos <= query_pos) & (query_pos - key_pos <= window)
