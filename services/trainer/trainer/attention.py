"""
Causal (sliding-window) attention behind one function. flash-attn runs it when it is installed, the
tensors are bf16/fp16 on a GPU (FA3 on Hopper, FA2 elsewhere); PyTorch's scaled_dot_product_attention
runs it otherwise (CPU, fp32, no flash-attn), with an explicit mask when a window or a KV cache needs one.

Shapes: q (B, Tq, heads, head_dim); k, v (B, Tk, kv_heads, head_dim) with Tk ≥ Tq. The queries are
the last Tq positions, or, with a KV cache whose rows hold different lengths, at `query_positions`
(B, Tq): then each row sees its own keys up to its own position (keys past it are stale or empty).
`window` counts the earlier keys a query sees besides its own (flash-attn's left window, as the
reference passes it): window + 1 keys.
"""

import functools

import torch
import torch.nn.functional as F

try:  # FA3: Hopper only
    from flash_attn_interface import flash_attn_func as fa3_func
except ImportError:
    fa3_func = None
try:  # FA2: Ampere and newer
    from flash_attn import flash_attn_func as fa2_func
except ImportError:
    fa2_func = None

FLASH_ATTN = "fa3" if fa3_func else "fa2" if fa2_func else None  # what is installed


@functools.cache
def flash_function(device: torch.device):
    """FA3 on Hopper (SM 9.x), FA2 on other GPUs, None when neither applies."""
    major, _ = torch.cuda.get_device_capability(device)
    if major == 9 and fa3_func is not None:
        return fa3_func
    return fa2_func if major >= 8 else None


def uses_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and flash_function(q.device) is not None


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
        out = flash_function(q.device)(q, k, v, causal=True, window_size=(window, 0))
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
