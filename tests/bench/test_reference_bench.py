"""bench/reference.py reads nanochat's own output: the per-step losses it recovers from chat_sft's printed
EMA, and the val bpb lines, are what the reference computed (the side-by-side rows in RESULTS.md rest
on them)."""

import importlib.util

import pytest

from support import ROOT

spec = importlib.util.spec_from_file_location("reference_bench", ROOT / "bench" / "reference.py")
reference_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference_bench)


def printed_like_nanochat(losses: list[float], beta: float = 0.9) -> list[float]:
    """What 92d63d4's chat_sft prints: `step += 1` first, then the EMA debiased with beta^(step+1)."""
    smooth, printed = 0.0, []
    for step, loss in enumerate(losses, start=1):
        smooth = beta * smooth + (1 - beta) * loss
        printed.append(round(smooth / (1 - beta ** (step + 1)), 6))  # printed to 6 decimals
    return printed


def test_each_steps_loss_is_recovered_from_the_references_printed_ema() -> None:
    losses = [8.9831, 10.1136, 7.7401, 6.25, 5.5, 5.75, 4.9]
    assert reference_bench.raw_losses(printed_like_nanochat(losses)) == pytest.approx(losses, abs=5e-4)


def test_the_references_val_bpb_lines_are_read_by_step() -> None:
    log = (
        "step 00099/00300 (33.00%) | loss: 6.400566\n"
        "Step 00100 | Validation bpb: 2.346712\n"
        "Step 00300 | Validation bpb: 1.9849\n"
    )
    assert reference_bench.printed_val_bpb(log) == {100: 2.3467, 300: 1.9849}
