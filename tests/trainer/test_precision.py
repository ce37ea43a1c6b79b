"""Precision: which dtype a device gets, fp16 with a grad scaler (on CPU too), and skipped steps that
every rank agrees on."""

import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer import base_train, scaling, training
from trainer.gpt import GPT, GPTConfig
from trainer.runtime import Runtime, resolve_dtype

from support import free_port


@pytest.mark.parametrize(
    ("capability", "expected"), [((7, 0), torch.float32), ((7, 5), torch.float32), ((8, 0), torch.bfloat16)]
)
def test_auto_dtype_is_bf16_from_ampere_on_and_fp32_before(monkeypatch, capability, expected) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_dtype("auto", torch.device("cuda")) == expected
    assert resolve_dtype("float16", torch.device("cuda")) == torch.float16  # asked for: kept


def test_cpu_defaults_to_fp32() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def tiny_model(dtype: torch.dtype, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=64, vocab_size=300, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    model = GPT(config)
    model.init_weights()
    model.set_compute_dtype(dtype)
    return model


def test_fp16_keeps_embeddings_fp32_and_computes_in_fp16() -> None:
    model = tiny_model(torch.float16)
    assert model.wte.weight.dtype == torch.float32
    assert all(e.weight.dtype == torch.float32 for e in model.value_embeds.values())
    assert model.cos.dtype == torch.float16 and model.blocks[0].attn.c_q.weight.dtype == torch.float32
    block_outputs = []
    model.blocks[0].register_forward_hook(lambda module, args, output: block_outputs.append(output.dtype))
    logits = model(torch.randint(0, 300, (2, 16)))
    assert block_outputs == [torch.float16] and logits.dtype == torch.float32


def optimizer_for(model: GPT):
    args = base_train.parser.parse_args([])
    horizon = scaling.horizon(1000, 1000, ratio=10.5, total_batch_size=2**19, num_iterations=10)
    return base_train.build_optimizer(model, args, horizon)


def batches(seed: int):
    """The same random batch over and over: a model that learns lowers its loss on it."""
    tokens = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(seed))
    return itertools.repeat((tokens[:, :-1], tokens[:, 1:]))


def poison_next_backward(model: GPT) -> None:
    """The next backward pass writes an inf into one gradient (then the hook removes itself)."""

    def to_inf(grad: torch.Tensor) -> torch.Tensor:
        handle.remove()
        return torch.full_like(grad, float("inf"))

    handle = model.blocks[0].mlp.c_fc.weight.register_hook(to_inf)


def snapshot(model: GPT) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_fp16_trains_on_cpu_and_skips_the_step_with_an_inf_gradient() -> None:
    model = tiny_model(torch.float16)
    optimizer, scaler = optimizer_for(model), torch.amp.GradScaler("cpu")
    runtime, data = Runtime(torch.device("cpu"), torch.float16), batches(0)
    losses = []
    for step in range(5):
        before, scale = snapshot(model), scaler.get_scale()
        if step == 2:
            poison_next_backward(model)
        losses.append(training.train_step(model, data, optimizer, 1, scaler, runtime))
        after = snapshot(model)
        if step == 2:  # skipped: no weight moved, and the scale halved
            assert all(torch.equal(before[name], after[name]) for name in before)
            assert scaler.get_scale() == scale / 2
        else:
            assert not torch.equal(before["blocks.0.mlp.c_fc.weight"], after["blocks.0.mlp.c_fc.weight"])
            assert scaler.get_scale() == scale
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def skip_worker(rank: int, port: int, results) -> None:
    """Rank 1 alone sees an inf in its gradients; both ranks must skip that step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = tiny_model(torch.float16)
    optimizer, scaler = optimizer_for(model), torch.amp.GradScaler("cpu")
    runtime = Runtime(torch.device("cpu"), torch.float16, rank, rank, world_size=2)
    data = batches(rank)
    training.train_step(model, data, optimizer, 1, scaler, runtime)
    before = snapshot(model)
    if rank == 1:
        poison_next_backward(model)
    training.train_step(model, data, optimizer, 1, scaler, runtime)
    after = snapshot(model)
    results[rank] = {
        "unchanged": all(torch.equal(before[name], after[name]) for name in before),
        "scale": scaler.get_scale(),
    }
    dist.destroy_process_group()


def test_every_rank_skips_the_step_when_one_rank_finds_an_inf() -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(skip_worker, args=(free_port(), results), nprocs=2, start_method="fork")
        per_rank = dict(results)
    assert per_rank[0] == per_rank[1] == {"unchanged": True, "scale": 65536.0 / 2}
