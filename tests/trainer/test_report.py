"""The report card: system, cost, a score table per stage, PNG charts and every section."""

import json
from pathlib import Path

import pytest

from trainer import report
from trainer.settings import TrainerSettings

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(settings: TrainerSettings, stage: str, records: list[dict]) -> None:
    path = settings.run_dir("r") / stage / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_report_has_every_section_a_score_table_a_cost_and_real_charts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_GPU_HOUR_PRICE", "2.5")
    settings = TrainerSettings()
    write_metrics(
        settings,
        "base",
        [{"step": s, "loss": 9 - s / 100, "tok_per_s": 1000.0, "mfu": 0.4} for s in range(1, 50)]
        + [{"step": 0, "val_bpb": 3.2}, {"step": 49, "val_bpb": 2.1}],
    )
    write_metrics(settings, "sft", [{"step": s, "loss": 3 - s / 10} for s in range(1, 10)])
    trained = {"steps": 49, "gpus": 8, "wall_seconds": 1800.0}
    report.write_section(settings, "r", "base_train", trained, {"depth": 20, "compile": True, "dtype": None})
    core = {"core": 0.2219, "core_per_task": {"copa": {"accuracy": 0.6}}}
    report.write_section(settings, "r", "base_eval", core, {"max_per_task": 100})
    chat = {"ARC-Easy": 0.388, "ARC-Challenge": 0.281, "MMLU": 0.315, "GSM8K": 0.046, "HumanEval": 0.085}
    chat.update(chatcore=0.0884, gpus=0, wall_seconds=36.0)
    report.write_section(settings, "r", "chat_eval_sft", chat, {"source": "sft"})

    path = report.main(["--run", "r"])
    card = path.read_text()
    assert card.startswith("# nanochat report card: run `r`")
    assert "- code:" in card and "- torch:" in card and "- gpus:" in card
    assert "4.00 GPU-hours × $2.50/GPU-hour ≈ **$10.00**" in card and "CPU-only time: 0.01 hours" in card
    assert "| BASE | 0.2219 | – | – | – | – | – | – | – |" in card
    assert "| SFT | – | 0.3880 | 0.2810 | 0.3150 | 0.0460 | 0.0850 | – | 0.0884 |" in card
    for section in (
        "### base_train",
        "### base_eval",
        "### chat_eval_sft",
        "| copa | 0.6 |",
        "`--depth 20 --compile True`",
    ):
        assert section in card
    for chart in ("train_loss", "val_bpb", "tok_per_s", "mfu"):
        assert f"![{chart}]({chart}.png)" in card
        png = (path.parent / f"{chart}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_report_of_an_unknown_run_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    with pytest.raises(SystemExit, match="no run 'ghost'"):
        report.main(["--run", "ghost"])
