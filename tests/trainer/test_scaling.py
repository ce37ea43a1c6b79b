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
    horizon = scaling.horizon(n, ratio=10.5)
    assert horizon.total_batch_size == 2**19
    assert horizon.lr_scale == 1.0 and horizon.weight_decay == pytest.approx(0.28, rel=1e-3)
    assert horizon.num_iterations == round(10.5 * n / 2**19)


def test_bigger_models_get_bigger_batches_and_less_weight_decay() -> None:
    horizons = [
        scaling.horizon(scaling.scaling_params(scaling.model_config(d, 32768, 2048)), 10.5)
        for d in (6, 12, 20, 32)
    ]
    batches = [h.total_batch_size for h in horizons]
    assert batches == sorted(batches) and batches[0] < batches[-1]
    assert all(b & (b - 1) == 0 for b in batches)  # powers of two
    decays = [h.weight_decay for h in horizons]
    assert decays == sorted(decays, reverse=True)


def test_explicit_batch_and_steps_win() -> None:
    horizon = scaling.horizon(5_000_000, ratio=10.5, total_batch_size=4096, num_iterations=300)
    assert (horizon.total_batch_size, horizon.num_iterations, horizon.tokens) == (4096, 300, 4096 * 300)
    assert horizon.lr_scale == pytest.approx((4096 / 2**19) ** 0.5)


def test_lr_schedule_warms_up_holds_and_warms_down_to_five_percent() -> None:
    total = 1000
    lrm = [scaling.lr_multiplier(s, total) for s in range(total)]
    assert lrm[0] == pytest.approx(1 / 40) and lrm[39] == 1.0
    assert all(m == 1.0 for m in lrm[40:350])  # warm-down is the last 65%
    assert lrm[351] < 1.0 and lrm[-1] == pytest.approx(0.05 + 0.95 / 650, rel=1e-3)
    assert scaling.lr_multiplier(total, total) == pytest.approx(0.05)


def test_muon_momentum_and_weight_decay_schedules() -> None:
    assert scaling.muon_momentum(0, 10_000) == pytest.approx(0.85)
    assert scaling.muon_momentum(400, 10_000) == pytest.approx(0.97)
    assert scaling.muon_momentum(10_000, 10_000) == pytest.approx(0.90)
    assert scaling.weight_decay_multiplier(0, 100) == 1.0
    assert scaling.weight_decay_multiplier(50, 100) == pytest.approx(0.5)
    assert scaling.weight_decay_multiplier(100, 100) == pytest.approx(0.0)
