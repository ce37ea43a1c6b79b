"""
Causal (sliding-window) attention behind one function. flash-attn runs it when it is installed, the
tensors are bf16/fp16 on a GPU (FA3 on Hopper, FA2 elsewhere); PyTorch's scaled_dot_product_attention
runs it otherwise (CPU, fp32, no flash-attn), with an explicit mask when a window or a KV cache needs one.

Shapes: q (B, Tq, heads, head_dim); k, v (B, Tk, kv_heads, head_dim) with Tk ≥ Tq — the queries are
the last Tq positions (Tq < Tk while decoding with a KV cache). `window` counts the keys a query
sees, itself included.
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Softmax attention of each query over the `window` most recent keys up to its own position."""
    q_len, k_len = q.size(1), k.size(1)
    if uses_flash(q):
        # window_size=(left, right): `left` earlier keys are visible; -1 = unlimited. flash-attn aligns
        # causality bottom-right, which is exactly "queries are the last Tq positions".
        left = window - 1 if window < k_len else -1
        out = flash_function(q.device)(q, k, v, causal=True, window_size=(left, 0))
        return out[0] if isinstance(out, tuple) else out  # FA3 also returns the log-sum-exp
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA wants (B, heads, T, D)
    gqa = q.size(1) != k.size(1)
    if q_len == k_len and window >= k_len:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        mask = causal_window_mask(q_len, k_len, window, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return y.transpose(1, 2)


def causal_window_mask(q_len: int, k_len: int, window: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) booleans, True where query i (at position k_len − q_len + i) may attend key j."""
    query_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    key_pos = torch.arange(k_len, device=device)[None, :]
    return (key_pos <= query_pos) & (key_pos > query_pos - window)
