"""
One optimizer for the whole model: Muon for the hidden matrices, AdamW for everything else
(embeddings, lm_head, scalars), each parameter group with its own learning rate and betas.

It also does the multi-process gradient communication, so no DDP wrapper is needed: AdamW gradients
are all-reduced; each Muon group (matrices of one shape) is stacked and reduce-scattered, so every
rank orthogonalises only its share, and the updated matrices are all-gathered. The result equals
one process with gradient accumulation over the same micro-batches (up to float rounding).

Muon (https://kellerjordan.github.io/posts/muon/), per stack of same-shape matrices, in this order:
1. Nesterov momentum;
2. a cast to bf16 when the compute dtype is bf16 (fp32 and fp16 runs orthogonalise in fp32);
3. MuonEq row equilibration: every row scaled to the mean row norm, so the spectrum entering the
   iteration is better conditioned (https://arxiv.org/abs/2603.28254);
4. X / (1.01·‖X‖_F) and 5 Polar Express iterations towards the nearest semi-orthogonal matrix
   (Amsel et al. 2025, https://arxiv.org/abs/2505.16932);
5. Muon+: the Frobenius norm snapped to √min(rows, cols), that of an exactly semi-orthogonal
   matrix, correcting the iteration's under-convergence (https://arxiv.org/abs/2602.21545);
6. NorMuon: a factored second moment evens out the rows (or columns), keeping the update's norm
   (https://arxiv.org/abs/2510.05491);
7. cautious weight decay (only where update and weight agree in sign), LR × √max(1, rows/cols).
"""

import math

import torch
import torch.distributed as dist
from torch import Tensor

# Polar Express coefficients for 5 steps (the paper's schedule, safety factor 2e-2, cushion 2).
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def equilibrate_rows(X: Tensor) -> Tensor:
    """MuonEq: each row rescaled to the mean row norm ‖X‖_F/√rows (norms computed in fp32)."""
    target = X.float().norm(dim=(-2, -1), keepdim=True) / math.sqrt(X.size(-2))
    row_norms = X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return X * (target / row_norms).to(X.dtype)


def orthogonalize(X: Tensor, steps: int = 5) -> Tensor:
    """≈ U·Vᵀ for X = U·S·Vᵀ (batched over leading dims): singular values pushed to ~1.
    Matmuls run in X's dtype; the element-wise sums in fp32, rounded once, as the reference's fused
    (compiled) kernel computes them: in bf16, rounding after every operation costs ~1.5× the error."""
    dtype = X.dtype
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)  # singular values into [0, 1)
    tall = X.size(-2) > X.size(-1)  # tall: iterate on the smaller Gram matrix XᵀX
    for a, b, c in POLAR_EXPRESS[:steps]:
        A = X.mT @ X if tall else X @ X.mT
        B = (b * A.float() + c * (A @ A).float()).to(dtype)
        X = (a * X.float() + (X @ B if tall else B @ X).float()).to(dtype)
    return X


def muon_direction(G: Tensor, bf16: bool, steps: int = 5) -> Tensor:
    """Steps 2-5 on the momentum-blended gradient: the fp32 semi-orthogonal update direction."""
    X = equilibrate_rows(G.bfloat16() if bf16 else G)
    update = orthogonalize(X, steps).float()
    target_norm = math.sqrt(min(update.size(-2), update.size(-1)))
    return update * (target_norm / update.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6))


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class MuonAdamW(torch.optim.Optimizer):
    """
    param_groups: dicts with 'params', 'kind' ('muon' or 'adamw') and 'lr', plus
    - muon: 'momentum', 'beta2' (second moment), 'weight_decay', 'ns_steps'; all params of one shape;
    - adamw: 'betas', 'eps', 'weight_decay'.
    A training loop schedules 'lr', 'momentum' and 'weight_decay' by writing them into the groups.
    compute_dtype: the model's; Muon orthogonalises in bf16 only when it is bf16.
    """

    def __init__(self, param_groups: list[dict], compute_dtype: torch.dtype = torch.float32) -> None:
        self.bf16_orthogonalize = compute_dtype == torch.bfloat16
        for group in param_groups:
            assert group["kind"] in ("muon", "adamw"), f"unknown kind {group['kind']!r}"
            if group["kind"] == "muon":
                shapes = {p.shape for p in group["params"]}
                assert len(shapes) == 1 and len(next(iter(shapes))) == 2, (
                    "a Muon group holds 2-D params of one shape"
                )
        super().__init__(param_groups, defaults={})

    @torch.no_grad()
    def step(self) -> None:
        rank, world_size = world()
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self.adamw_step(group, world_size)
            else:
                self.muon_step(group, rank, world_size)

    def adamw_step(self, group: dict, world_size: int) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            grad = p.grad
            if world_size > 1:
                dist.all_reduce(grad)
                grad.div_(world_size)
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            # In fp32, rounded once at the end: on a bf16 embedding, p·(1 − lr·wd) alone rounds back
            # to p. For fp32 params .float() is the tensor itself, updated in place.
            p32, grad32 = p.float(), grad.float()
            exp_avg, exp_avg_sq = state["exp_avg"].float(), state["exp_avg_sq"].float()
            p32.mul_(1 - lr * wd)  # decoupled weight decay
            exp_avg.lerp_(grad32, 1 - beta1)
            exp_avg_sq.lerp_(grad32.square(), 1 - beta2)
            bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
            denominator = (exp_avg_sq / bias2).sqrt_().add_(eps)
            p32.addcdiv_(exp_avg, denominator, value=-lr / bias1)
            p.copy_(p32)  # copying a tensor onto itself returns at once
            state["exp_avg"].copy_(exp_avg)
            state["exp_avg_sq"].copy_(exp_avg_sq)

    def muon_step(self, group: dict, rank: int, world_size: int) -> None:
        params: list[Tensor] = group["params"]
        rows, cols = params[0].shape
        per_rank = math.ceil(len(params) / world_size)  # this rank updates params [mine]
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        grads = torch.stack([p.grad for p in params])
        grads = torch.cat([grads, grads.new_zeros(per_rank * world_size - len(params), rows, cols)])
        if world_size > 1:
            my_grads = grads.new_empty(per_rank, rows, cols)
            dist.reduce_scatter_tensor(my_grads, grads)
            my_grads.div_(world_size)
        else:
            my_grads = grads

        state = self.state[params[0]]  # one state per group: this rank's share of it
        reduce_dim = -1 if rows >= cols else -2  # second moment per row of tall, per column of wide
        if not state:
            state["momentum_buffer"] = torch.zeros_like(my_grads)
            factored = (per_rank, rows, 1) if reduce_dim == -1 else (per_rank, 1, cols)
            state["second_moment"] = my_grads.new_zeros(factored)

        # 1. Nesterov momentum; 2-5. the semi-orthogonal direction.
        momentum = group["momentum"]
        state["momentum_buffer"].lerp_(my_grads, 1 - momentum)
        blended = my_grads.lerp_(state["momentum_buffer"], momentum)
        update = muon_direction(blended, self.bf16_orthogonalize, group["ns_steps"])

        # 6. NorMuon: divide by a running per-row RMS, then restore the update's overall norm.
        mean_square = update.square().mean(dim=reduce_dim, keepdim=True)
        state["second_moment"].lerp_(mean_square, 1 - group["beta2"])
        scale = state["second_moment"].clamp_min(1e-10).rsqrt()
        norm_before = mean_square.sum(dim=(-2, -1), keepdim=True).sqrt()
        norm_after = (mean_square * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
        update = update * scale * (norm_before / norm_after.clamp_min(1e-10))

        # 7. Shape-aware step (√(rows/cols) for tall matrices), cautious weight decay.
        lr = group["lr"] * math.sqrt(max(1.0, rows / cols))
        stacked = torch.stack(params)
        stacked = torch.cat([stacked, stacked.new_zeros(per_rank * world_size - len(params), rows, cols)])
        my_params = stacked[mine]
        shrinks = (update * my_params) >= 0
        my_params.sub_(lr * update + lr * group["weight_decay"] * my_params * shrinks)
        if world_size > 1:
            dist.all_gather_into_tensor(stacked, my_params.clone())  # input must not alias the output
        for p, updated in zip(params, stacked, strict=False):
            p.copy_(updated)
