"""`python -m trainer.tok_train` and `trainer.tok_eval`, run as a user would (in-process main())."""

import json
from pathlib import Path

import pytest

from trainer import tok_eval, tok_train
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer


@pytest.fixture
def env_for(monkeypatch: pytest.MonkeyPatch):
    def point_at(settings: TrainerSettings) -> TrainerSettings:
        monkeypatch.setenv("NANOCHAT_BASE_DIR", str(settings.base_dir))
        monkeypatch.setenv("NANOCHAT_DATA_DIR", str(settings.data_dir))
        return settings

    return point_at


def test_tok_train_saves_tokenizer_and_report(tiny_kit: TrainerSettings, env_for, capsys) -> None:
    settings = env_for(tiny_kit)
    summary = tok_train.main(
        ["--run", "t", "--vocab-size", "500", "--max-chars", "20000", "--doc-cap", "1000"]
    )
    output = capsys.readouterr().out
    assert "--vocab-size = 500" in output and "tokenizer trained:" in output  # settings first, report last
    assert summary["chars_seen"] == 20_000 and summary["vocab_size"] == 500
    assert Tokenizer.load(settings.run_dir("t") / "tokenizer").vocab_size == 500
    report = settings.run_dir("t") / "report"
    section = json.loads((report / "tok_train.json").read_text())
    assert section.pop("system")["python"] and section.pop("config")["vocab_size"] == 500
    assert section == summary
    assert "## tok_train" in (report / "report.md").read_text()


@pytest.mark.parametrize("argv", [["--run", "../escape"], ["--vocab-size", "100"]])
def test_tok_train_rejects_bad_flags(tiny_kit: TrainerSettings, env_for, argv: list[str]) -> None:
    env_for(tiny_kit)
    with pytest.raises(SystemExit) as exit_info:
        tok_train.main(argv)
    assert exit_info.value.code == 2


def test_tok_eval_compares_on_every_available_set(data_kit: Path, tmp_path: Path, env_for, capsys) -> None:
    env_for(TrainerSettings(base_dir=tmp_path, data_dir=data_kit))
    tok_train.main(["--run", "e", "--vocab-size", "2048"])
    summary = tok_eval.main(["--run", "e", "--max-chars", "200000"])
    output = capsys.readouterr().out
    # Bytes per token of a 2,048-token vocab trained on the kit's pretraining text: best on text like
    # it, worst on code and math.
    expected = {
        "pretrain-val": 3.026,
        "smoltalk-test": 2.715,
        "gsm8k-test": 2.179,
        "mmlu-test": 2.503,
        "arc-easy-test": 2.719,
        "humaneval-test": 1.973,
    }
    for name, bytes_per_token in expected.items():
        assert summary[f"{name}/ours"] == pytest.approx(bytes_per_token, abs=0.02), name
        assert name in output
    if not any(key.endswith("/gpt2") for key in summary):  # offline, uncached: said, not hidden
        assert "note: gpt2: skipped" in output
