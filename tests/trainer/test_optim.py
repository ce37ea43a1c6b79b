"""Muon+AdamW: orthogonal updates, AdamW as PyTorch's, and 2 processes equal 1 with accumulation."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.gpt import GPT, GPTConfig
from trainer.optim import MuonAdamW, orthogonalize


def with_singular_values(rows: int, cols: int, singular: torch.Tensor) -> torch.Tensor:
    """U·diag(singular)·Vᵀ with random orthonormal U, V."""
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular)))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular)))
    return u @ torch.diag(singular) @ v.T


@pytest.mark.parametrize(("rows", "cols"), [(64, 64), (64, 256), (256, 64), (96, 384)])
def test_orthogonalize_pushes_every_singular_value_near_one(rows: int, cols: int) -> None:
    torch.manual_seed(0)
    G = with_singular_values(rows, cols, torch.logspace(-1, 1, min(rows, cols)))  # condition number 100
    singular = torch.linalg.svdvals(orthogonalize(G).float())
    assert singular.min() > 0.6 and singular.max() < 1.25


def test_orthogonalize_works_on_stacks_of_matrices() -> None:
    torch.manual_seed(0)
    stack = torch.stack([with_singular_values(32, 48, torch.logspace(-1, 0, 32)) for _ in range(3)])
    one_by_one = torch.stack([orthogonalize(matrix) for matrix in stack])
    assert torch.equal(orthogonalize(stack), one_by_one)


def test_muon_update_is_near_orthogonal() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(128, 32))
    before = weight.detach().clone()
    optimizer = MuonAdamW(
        [
            {
                "kind": "muon",
                "params": [weight],
                "lr": 0.01,
                "momentum": 0.0,
                "beta2": 0.9,
                "weight_decay": 0.0,
                "ns_steps": 5,
            }
        ]
    )
    weight.grad = with_singular_values(128, 32, torch.logspace(-2, 1, 32))
    optimizer.step()
    update = (before - weight.detach()) / (0.01 * 2)  # lr × √(rows/cols) for this tall matrix
    singular = torch.linalg.svdvals(update)
    assert singular.max() / singular.min() < 2.0


def test_adamw_groups_match_pytorch_adamw() -> None:
    torch.manual_seed(0)
    ours, reference = torch.nn.Parameter(torch.randn(10, 5)), torch.nn.Parameter(torch.zeros(10, 5))
    with torch.no_grad():
        reference.copy_(ours)
    hyper = {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-10, "weight_decay": 0.1}
    optimizer = MuonAdamW([{"kind": "adamw", "params": [ours], **hyper}])
    torch_adamw = torch.optim.AdamW([reference], **hyper)
    for _ in range(5):
        grad = torch.randn(10, 5)
        ours.grad, reference.grad = grad.clone(), grad.clone()
        optimizer.step()
        torch_adamw.step()
    assert torch.allclose(ours, reference, atol=1e-6)


def build(seed: int = 0) -> tuple[GPT, MuonAdamW]:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=200, n_layer=3, n_head=2, n_kv_head=1, n_embd=32))
    model.init_weights()
    groups = [
        {
            "kind": "adamw",
            "params": [
                p
                for p in model.parameters()
                if p.ndim != 2 or p is model.lm_head.weight or p is model.smear_gate.weight
            ],
            "lr": 0.01,
            "betas": (0.8, 0.95),
            "eps": 1e-10,
            "weight_decay": 0.01,
        }
    ]
    matrices = model.matrix_params()
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(
            {
                "kind": "muon",
                "params": [p for p in matrices if tuple(p.shape) == shape],
                "lr": 0.02,
                "momentum": 0.95,
                "beta2": 0.9,
                "weight_decay": 0.1,
                "ns_steps": 5,
            }
        )
    return model, MuonAdamW(groups)


def micro_batches(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randint(0, 200, (2, 33), generator=generator) for _ in range(2)]


def single_process_with_accumulation(steps: int) -> dict[str, torch.Tensor]:
    model, optimizer = build()
    for step in range(steps):
        for batch in micro_batches(step):
            (model(batch[:, :-1], batch[:, 1:]) / 2).backward()
        optimizer.step()
        model.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def distributed_worker(rank: int, port: int, steps: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model, optimizer = build()
    for step in range(steps):
        batch = micro_batches(step)[rank]  # each process takes one of the two micro-batches
        model(batch[:, :-1], batch[:, 1:]).backward()
        optimizer.step()
        model.zero_grad()
    results[rank] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process_with_accumulation() -> None:
    steps = 4
    expected = single_process_with_accumulation(steps)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            distributed_worker, args=(free_port(), steps, results), nprocs=2, start_method="fork"
        )
        per_rank = dict(results)
    for name, tensor in expected.items():
        assert torch.equal(per_rank[0][name], per_rank[1][name]), f"{name}: ranks diverged"
        assert torch.allclose(per_rank[0][name], tensor, atol=2e-5), f"{name}: differs from accumulation"
