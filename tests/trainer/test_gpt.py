"""The GPT: the recipe's shapes and initialisation, and a KV cache that reproduces the full forward."""

import math

import pytest
import torch

from trainer.engine import KVCache
from trainer.gpt import GPT, GPTConfig, norm


def tiny_config(**overrides) -> GPTConfig:
    base = {"sequence_len": 512, "vocab_size": 1000, "n_layer": 4, "n_head": 4, "n_kv_head": 2, "n_embd": 64}
    return GPTConfig(**{**base, **overrides})


def randomized(config: GPTConfig, seed: int = 0) -> GPT:
    """A model whose zero-initialised parts are not zero, so every path carries signal."""
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_window_pattern_is_tiled_with_the_last_layer_full() -> None:
    config = GPTConfig(sequence_len=2048, n_layer=6, window_pattern="SSSL")
    assert config.window_sizes() == [512, 512, 512, 2048, 512, 2048]
    assert GPTConfig(sequence_len=1000, n_layer=2, window_pattern="S").window_sizes() == [256, 1000]
    assert GPTConfig(n_layer=3, window_pattern="L").window_sizes() == [2048] * 3


def test_value_embeddings_on_alternating_layers_ending_with_the_last() -> None:
    assert sorted(GPT(tiny_config(n_layer=5)).value_embeds) == ["0", "2", "4"]
    assert sorted(GPT(tiny_config(n_layer=4)).value_embeds) == ["1", "3"]
    assert not GPT(tiny_config(value_embeds=False)).value_embeds


def test_vocab_is_padded_to_64_and_logits_cropped_back() -> None:
    model = GPT(tiny_config())
    model.init_weights()
    assert model.wte.weight.shape[0] == model.lm_head.weight.shape[0] == 1024
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 1000)


def test_initialisation_follows_the_recipe() -> None:
    torch.manual_seed(0)
    model = GPT(tiny_config(n_embd=256, n_head=2, n_kv_head=2))
    model.init_weights()
    block = model.blocks[0]
    assert (
        torch.count_nonzero(block.attn.c_proj.weight) == 0
        and torch.count_nonzero(block.mlp.c_proj.weight) == 0
    )
    assert abs(model.wte.weight.std().item() - 0.8) < 0.02
    assert abs(model.lm_head.weight.std().item() - 0.001) < 1e-4
    assert abs(block.attn.c_q.weight.std().item() - 256**-0.5) < 0.003  # U(±√3/√width)
    assert block.attn.c_q.weight.abs().max() <= math.sqrt(3 / 256)
    assert torch.allclose(model.resid_lambdas, torch.linspace(1.15, 1.05, 4))
    assert torch.allclose(model.x0_lambdas, torch.linspace(0.20, 0.05, 4))
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    # With a near-zero lm_head the first prediction is uniform: the loss is ln(vocab).
    idx = torch.randint(0, 1000, (2, 32))
    assert model(idx, idx).item() == pytest.approx(math.log(1000), abs=0.01)


@pytest.mark.parametrize("pattern", ["L", "SL"])
def test_kv_cache_decoding_matches_the_full_forward(pattern: str) -> None:
    # sequence_len 512 gives S layers a 128-token window: the 200-token sequence crosses it.
    model = randomized(tiny_config(window_pattern=pattern))
    idx = torch.randint(0, 1000, (2, 200))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model, batch_size=2, max_len=200)
        prefill = model(idx[:, :150], kv_cache=cache)
        steps = [model(idx[:, t : t + 1], kv_cache=cache) for t in range(150, 200)]
    assert torch.allclose(torch.cat([prefill, *steps], dim=1), full, atol=1e-4)


def test_the_rotary_table_covers_ten_times_the_context_and_grows_for_a_longer_input() -> None:
    """Prompts longer than the context (CORE's few-shot ones) run uncropped: the reference's 10× table,
    extended with the same values where the reference would stop."""
    model = randomized(tiny_config(sequence_len=16, window_pattern="L")).eval()
    table = model.cos.clone()
    assert table.shape[1] == 160
    idx = torch.randint(0, 1000, (1, 200))
    with torch.no_grad():
        within = model(idx[:, :160])
        longer = model(idx)
    assert model.cos.shape[1] == 200 and torch.equal(model.cos[:, :160], table)
    assert longer.shape == (1, 200, 1000) and torch.allclose(longer[:, :160], within, atol=1e-5)


def test_flops_per_token_counts_matmuls_and_windowed_attention() -> None:
    config = tiny_config(window_pattern="SL")
    model = GPT(config)
    matmul_params = sum(p.numel() for p in model.matrix_params()) + model.lm_head.weight.numel() + 24
    attention = 12 * 4 * 16 * (128 + 512 + 128 + 512)
    assert model.estimate_flops() == 6 * matmul_params + attention


def test_bf16_compute_keeps_fp32_masters_and_fp32_logits() -> None:
    model = randomized(tiny_config())
    model.set_compute_dtype(torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16 and model.blocks[0].attn.c_q.weight.dtype == torch.float32
    idx = torch.randint(0, 1000, (2, 16))
    logits = model(idx)
    assert logits.dtype == torch.float32 and logits.abs().max() <= 15  # soft-capped
    model(idx, idx).backward()
    assert model.blocks[0].attn.c_q.weight.grad.dtype == torch.float32


@pytest.mark.parametrize(("depth", "index"), [(2, 1), (4, 2), (12, 6)])
def test_backout_subtracts_the_residual_out_of_block_index_depth_over_two(depth: int, index: int) -> None:
    model = randomized(tiny_config(n_layer=depth, sequence_len=64))
    block_outputs, head_inputs = [], []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, output: block_outputs.append(output))
    model.lm_head.register_forward_hook(lambda module, args, output: head_inputs.append(args[0]))
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 16)))
    backout = model.backout_lambda
    candidates = [norm(block_outputs[-1] - backout * kept) for kept in block_outputs]
    matches = [
        i for i, candidate in enumerate(candidates) if torch.allclose(candidate, head_inputs[0], atol=1e-5)
    ]
    assert matches == [index]


def test_bf16_forward_sees_residual_scalar_changes_smaller_than_a_bf16_step() -> None:
    # bf16 spacing near 1.15 is 0.0078; resid_λ learns in steps of ~0.0004, which must still count.
    model = randomized(tiny_config())
    model.set_compute_dtype(torch.bfloat16)
    idx = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        before = model(idx)
        model.resid_lambdas.add_(0.001)
        after = model(idx)
    assert not torch.equal(before, after)


def test_a_batch_with_no_target_to_learn_scores_zero_not_nan() -> None:
    """An SFT row can hold only a user's words: its mean loss must not poison the step with NaN."""
    torch.manual_seed(0)
    model = GPT(tiny_config())
    model.init_weights()
    idx = torch.randint(0, 100, (2, 8))
    nothing = torch.full_like(idx, -1)
    loss = model(idx, nothing)
    loss.backward()
    assert loss.item() == 0 and all(
        torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
    )
    some = nothing.clone()
    some[0, 3] = 7
    expected = torch.nn.functional.cross_entropy(model(idx)[0, 3:4], torch.tensor([7]))
    torch.testing.assert_close(model(idx, some), expected)


def test_without_layer_scalars_the_residual_is_plain() -> None:
    """--no-layer-scalars: no resid/x0 parameters, x is the plain sum of the blocks (the older nanochat)."""
    model = GPT(tiny_config(layer_scalars=False))
    model.init_weights()
    assert model.resid_lambdas is None and model.x0_lambdas is None
    assert not any("lambdas" in name and "smear" not in name and "backout" not in name
                   for name, _ in model.named_parameters())  # fmt: skip
