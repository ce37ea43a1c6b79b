"""The one dial: --depth derives shape, horizon, batch, LRs and weight decay as the recipe says."""

import pytest

from trainer import scaling


@pytest.mark.parametrize(
    ("depth", "head_dim", "width", "heads"),
    [
        (12, 128, 768, 6),
        (20, 128, 1280, 10),
        (24, 128, 1536, 12),
        (2, 128, 128, 1),
        (3, 128, 256, 2),
        (4, 64, 256, 4),
    ],
)
def test_width_is_64_per_layer_rounded_up_to_the_head_dim(depth, head_dim, width, heads) -> None:
    config = scaling.model_config(depth, vocab_size=32768, sequence_len=2048, head_dim=head_dim)
    assert (config.n_embd, config.n_head, config.n_kv_head, config.n_layer) == (width, heads, heads, depth)


def test_reference_depth_gets_the_reference_batch_lr_and_weight_decay() -> None:
    config = scaling.model_config(12, vocab_size=32768, sequence_len=2048)
    n = scaling.scaling_params(config)
    assert n == 12 * 12 * 768**2 + 6 * (6 * 12) + 768 * 32768  # blocks, VE gates on 6 layers, lm_head
    assert scaling.reference_params(32768, 2048) == n
    horizon = scaling.horizon(n, n, ratio=10.5)
    assert horizon.total_batch_size == 2**19
    assert horizon.lr_scale == 1.0 and horizon.weight_decay == pytest.approx(0.28, rel=1e-12)
    assert horizon.num_iterations == int(10.5 * n) // 2**19 == 2205


def test_the_d12_reference_is_built_with_the_runs_vocab_head_dim_and_aspect_ratio() -> None:
    # vocab 8192, head dim 64: 12 heads of 64 at width 768, VE gates 12 × 12 on layers 1, 3, ..., 11.
    assert scaling.reference_params(8192, 512, head_dim=64) == 12 * 12 * 768**2 + 6 * 12 * 12 + 768 * 8192
    # aspect ratio 32: width 384 at depth 12, 3 heads of 128.
    assert scaling.reference_params(8192, 512, aspect_ratio=32) == 12 * 12 * 384**2 + 6 * 12 * 3 + 384 * 8192


# The recipe's CPU configuration (d4, head dim 64, vocab 8192) and the speedrun's d20 (vocab 32768).
D4_PARAMS = 4 * 12 * 256**2 + 2 * 12 * 4 + 256 * 8192  # = 5,242,976
D4_REFERENCE = 12 * 12 * 768**2 + 6 * 12 * 12 + 768 * 8192  # = 91,226,976
D20_PARAMS = 20 * 12 * 1280**2 + 10 * 12 * 10 + 1280 * 32768  # = 435,160,240
D20_REFERENCE = 12 * 12 * 768**2 + 6 * 12 * 6 + 768 * 32768  # = 110,100,912


@pytest.mark.parametrize("num_iterations", [None, 300])
def test_d4_cpu_run_gets_the_planned_horizons_weight_decay_whatever_its_step_count(num_iterations) -> None:
    config = scaling.model_config(4, vocab_size=8192, sequence_len=512, head_dim=64)
    assert scaling.scaling_params(config) == D4_PARAMS
    assert scaling.reference_params(8192, 512, head_dim=64) == D4_REFERENCE
    horizon = scaling.horizon(
        D4_PARAMS, D4_REFERENCE, 10.5, total_batch_size=4096, num_iterations=num_iterations
    )
    assert horizon.planned_tokens == int(10.5 * D4_PARAMS) == 55_051_248
    assert horizon.total_batch_size == 4096 and horizon.lr_scale == pytest.approx(0.08838834764831845)
    assert horizon.weight_decay == pytest.approx(0.43062422324381894, rel=1e-12)  # not ≈19 at 300 steps
    assert horizon.num_iterations == (num_iterations or 55_051_248 // 4096)


@pytest.mark.parametrize("num_iterations", [None, 300])
def test_d20_gets_a_bigger_batch_and_less_weight_decay_whatever_its_step_count(num_iterations) -> None:
    assert scaling.scaling_params(scaling.model_config(20, 32768, 2048)) == D20_PARAMS
    horizon = scaling.horizon(D20_PARAMS, D20_REFERENCE, 10.5, num_iterations=num_iterations)
    # B = 2^round(log2(2^19 · (D/D_ref)^0.383)) with D/D_ref = 3.95: 2^20
    assert horizon.total_batch_size == 2**20 and horizon.lr_scale == pytest.approx(2**0.5)
    assert horizon.weight_decay == pytest.approx(0.28 * 2**0.5 * D20_REFERENCE / D20_PARAMS, rel=1e-6)
    assert horizon.weight_decay == pytest.approx(0.10018777642556008, rel=1e-12)
    assert horizon.num_iterations == (num_iterations or 4357)


# FLOPs per token as the reference counts them: 6 × matmul params (the scaling params and the smear
# gate's 24) + 12·heads·head_dim·window per layer (SSSL at 2048: windows of 512, every fourth 2048).
D20_FLOPS = 6 * (D20_PARAMS + 24) + 12 * 10 * 128 * (15 * 512 + 5 * 2048)  # = 2,886,212,784
D12_FLOPS = 6 * (D20_REFERENCE + 24) + 12 * 6 * 128 * (9 * 512 + 3 * 2048)  # = 759,696,048


def test_a_flops_budget_sets_the_steps_as_the_reference_rounds_them_and_moves_nothing_else() -> None:
    assert scaling.meta_model(scaling.model_config(20, 32768, 2048)).estimate_flops() == D20_FLOPS
    assert scaling.meta_model(scaling.model_config(12, 32768, 2048)).estimate_flops() == D12_FLOPS
    budget = scaling.horizon(D20_PARAMS, D20_REFERENCE, 10.5, target_flops=1e19, flops_per_token=D20_FLOPS)
    assert budget.num_iterations == round(1e19 / (D20_FLOPS * 2**20)) == 3304  # 3304.24
    ratio_only = scaling.horizon(D20_PARAMS, D20_REFERENCE, 10.5)
    assert ratio_only.num_iterations == 4357
    assert (budget.total_batch_size, budget.lr_scale, budget.weight_decay, budget.planned_tokens) == (
        ratio_only.total_batch_size,
        ratio_only.lr_scale,
        ratio_only.weight_decay,
        ratio_only.planned_tokens,
    )
    # The ratio cancels out of D/D_ref: at the reference's default 12 the same steps, batch and λ.
    at_12 = scaling.horizon(D20_PARAMS, D20_REFERENCE, 12, target_flops=1e19, flops_per_token=D20_FLOPS)
    assert (at_12.num_iterations, at_12.total_batch_size) == (3304, 2**20)
    assert at_12.weight_decay == pytest.approx(budget.weight_decay, rel=1e-9)
    # The reference's scaling-law sweep (runs/scaling_laws.sh): d12 at 1e18 FLOPs, B = 2^19.
    d12 = scaling.horizon(D20_REFERENCE, D20_REFERENCE, 12, target_flops=1e18, flops_per_token=D12_FLOPS)
    assert d12.num_iterations == round(1e18 / (D12_FLOPS * 2**19)) == 2511  # 2510.67: rounded, not floored
    # An explicit step count wins over a budget, as in the reference.
    both = scaling.horizon(D20_PARAMS, D20_REFERENCE, 10.5, None, 300, target_flops=1e19, flops_per_token=1)
    assert both.num_iterations == 300


def test_trained_weight_decay_horizon_puts_the_tokens_trained_in_d() -> None:
    horizon = scaling.horizon(D4_PARAMS, D4_REFERENCE, 10.5, 4096, 300, weight_decay_horizon="trained")
    assert horizon.weight_decay == pytest.approx(
        0.28 * (4096 / 2**19) ** 0.5 * 10.5 * D4_REFERENCE / (300 * 4096)
    )
    assert horizon.total_batch_size == 4096 and horizon.tokens == 300 * 4096


def test_bigger_models_get_bigger_batches_and_less_weight_decay() -> None:
    reference = scaling.reference_params(32768, 2048)
    horizons = [
        scaling.horizon(scaling.scaling_params(scaling.model_config(d, 32768, 2048)), reference, 10.5)
        for d in (6, 12, 20, 32)
    ]
    batches = [h.total_batch_size for h in horizons]
    assert batches == sorted(batches) and batches[0] < batches[-1]
    assert all(b & (b - 1) == 0 for b in batches)  # powers of two
    decays = [h.weight_decay for h in horizons]
    assert decays == sorted(decays, reverse=True)


def test_lr_schedule_warms_up_holds_and_warms_down_to_five_percent() -> None:
    total = 1000
    lrm = [scaling.lr_multiplier(s, total) for s in range(total)]
    assert lrm[0] == pytest.approx(1 / 40) and lrm[39] == 1.0
    assert all(m == 1.0 for m in lrm[40:350])  # warm-down is the last 65%
    assert lrm[351] < 1.0 and lrm[-1] == pytest.approx(0.05 + 0.95 / 650, rel=1e-3)
    assert scaling.lr_multiplier(total, total) == pytest.approx(0.05)


def test_muon_momentum_warms_up_over_400_steps_even_inside_the_warm_down() -> None:
    # A 300-step run is in its warm-down from step 105 on, but the warm-up rule wins below step 400.
    assert [scaling.muon_momentum(step, 300) for step in (0, 200, 399)] == pytest.approx(
        [0.85, 0.91, 0.85 + 0.12 * 399 / 400]
    )
    assert scaling.muon_momentum(400, 10_000) == pytest.approx(0.97)
    assert scaling.muon_momentum(2000, 10_000) == 0.97  # warm-down starts at 3500
    assert scaling.muon_momentum(10_000, 10_000) == pytest.approx(0.90)
    # After step 400 inside a warm-down (from 350 of 1000): 0.97 → 0.90 linearly.
    assert scaling.muon_momentum(400, 1000) == pytest.approx(0.97 - 0.07 * 50 / 650)


def test_weight_decay_follows_a_cosine_to_zero() -> None:
    assert scaling.weight_decay_multiplier(0, 100) == 1.0
    assert scaling.weight_decay_multiplier(50, 100) == pytest.approx(0.5)
    assert scaling.weight_decay_multiplier(100, 100) == pytest.approx(0.0)
