"""
FP8 training (`base_train --fp8`), as the reference's record speedrun uses it: the big Linear layers
run their three matmuls on float8 operands through torch._scaled_mm, with one dynamic scale per tensor.

    forward    y  = x · Wᵀ       x, W  in float8_e4m3fn (3 mantissa bits: precision)
    backward   dx = dy · W      dy    in float8_e5m2   (5 exponent bits: range, for gradients)
               dW = dyᵀ · x

Each operand is scaled by fp8_max / amax(|t|), recomputed at every call from the tensor itself
("tensorwise dynamic scaling": no history, so nothing to checkpoint), saturated and cast; _scaled_mm
multiplies the inverse scales back in and returns the compute dtype. Which layers: both dimensions
multiples of 16 (the float8 GEMM's rule on GPUs) and the smaller at least 128, so every attention and
MLP matrix and the lm_head, not the value-embedding gates or the smear gate.

Only training runs in float8. In eval mode (val bpb, CORE, samples) a converted layer is an ordinary
Linear in the compute dtype, as the reference evaluates inside its `disable_fp8`. The weights stay the
fp32 masters they were, shared with the model, so a checkpoint of an --fp8 run is an ordinary one.

GPUs run float8 matmuls from compute capability 8.9 (Ada, Hopper, Blackwell); torch 2.13 runs them on
CPUs too (no faster there: for tests and small runs).
"""

import torch
import torch.nn as nn

from trainer.gpt import Linear

FORWARD_DTYPE = torch.float8_e4m3fn
GRADIENT_DTYPE = torch.float8_e5m2
MIN_CAPABILITY = (8, 9)


def to_float8(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x scaled so that its largest magnitude lands on dtype's largest value, saturated and cast; and the
    inverse scale, as _scaled_mm takes it."""
    largest = torch.finfo(dtype).max
    amax = x.float().abs().max()
    # In float64 the scale rounds the same compiled and eager (torchao and the reference do this too);
    # the floor keeps an all-zero tensor finite.
    scale = (largest / amax.double().clamp(min=1e-12)).float()
    # Saturate before the cast: casting to float8 does not clamp an out-of-range value.
    scaled = (x.float() * scale).clamp(-largest, largest).to(dtype)
    return scaled, scale.reciprocal()


def column_major(x: torch.Tensor) -> torch.Tensor:
    """The same matrix stored column by column: cuBLAS wants _scaled_mm's second operand so."""
    return x.t().contiguous().t()


# allow_in_graph: torch.compile keeps the three float8 GEMMs as one opaque node around which it fuses
# the rest of the model, as the reference does.
@torch._dynamo.allow_in_graph
class Float8Matmul(torch.autograd.Function):
    """x (M, K) @ weight (N, K)ᵀ with every GEMM of forward and backward in float8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x8, x_inverse = to_float8(x, FORWARD_DTYPE)
        w8, w_inverse = to_float8(weight, FORWARD_DTYPE)
        ctx.save_for_backward(x8, x_inverse, w8, w_inverse)
        # w8 is row-major (N, K), so its transpose is already the column-major (K, N) cuBLAS wants.
        # Fast (lower-precision) accumulation in the forward only, as the reference and torchao do.
        return torch._scaled_mm(
            x8, w8.t(), scale_a=x_inverse, scale_b=w_inverse, out_dtype=x.dtype, use_fast_accum=True
        )

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x8, x_inverse, w8, w_inverse = ctx.saved_tensors
        grad8, grad_inverse = to_float8(grad, GRADIENT_DTYPE)
        grad_x = torch._scaled_mm(
            grad8, column_major(w8), scale_a=grad_inverse, scale_b=w_inverse, out_dtype=grad.dtype
        )
        # dW comes out in the compute dtype, as the reference's; autograd casts it to the fp32 master's.
        grad_w = torch._scaled_mm(
            grad8.t().contiguous(),
            column_major(x8),
            scale_a=grad_inverse,
            scale_b=x_inverse,
            out_dtype=grad.dtype,
        )
        return grad_x, grad_w


class Float8Linear(Linear):
    """A Linear whose training matmuls run in float8; in eval mode it is the Linear it replaced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        y = Float8Matmul.apply(x.reshape(-1, x.size(-1)), self.weight)  # _scaled_mm multiplies matrices
        return y.view(*x.shape[:-1], y.size(-1))


def convertible(linear: nn.Linear) -> bool:
    """The reference's rule: both dimensions multiples of 16, the smaller at least 128."""
    dims = (linear.in_features, linear.out_features)
    return all(d % 16 == 0 for d in dims) and min(dims) >= 128


def convert(model: nn.Module) -> tuple[int, int]:
    """Swap every convertible Linear of `model` for a Float8Linear sharing its weight (the optimizer's
    parameters and the checkpoint's tensors stay the same). Returns (converted, all Linear layers)."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear)]
    converted = [(name, m) for name, m in linears if type(m) is Linear and convertible(m)]
    for name, linear in converted:
        with torch.device("meta"):  # no second weight: the module takes the original's
            float8 = Float8Linear(linear.in_features, linear.out_features)
        float8.weight = linear.weight
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, float8)
    return len(converted), len(linears)


def check_device(device: torch.device) -> None:
    """SystemExit, in one line, unless float8 matmuls run on `device`."""
    if device.type == "cuda" and (capability := torch.cuda.get_device_capability(device)) < MIN_CAPABILITY:
        name, (major, minor) = torch.cuda.get_device_name(device), capability
        raise SystemExit(
            f"--fp8: {name} (compute capability {major}.{minor}) has no float8 matmuls; they need "
            f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ada, Hopper, Blackwell). Train without --fp8"
        )
    try:  # a trial GEMM: whatever else this torch or device lacks shows up here, not at the first step
        probe = torch.ones(16, 16, device=device).to(FORWARD_DTYPE)
        one = torch.ones((), device=device)
        torch._scaled_mm(probe, probe.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        message = f"--fp8: torch {torch.__version__} cannot run float8 matmuls on {device} ({reason})"
        raise SystemExit(f"{message}. Train without --fp8") from None
