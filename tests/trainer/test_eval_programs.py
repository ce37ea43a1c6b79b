"""base_eval and chat_eval run as a user runs them, on a tiny model trained on the kit."""

import json
import shutil
from pathlib import Path

import pytest

from trainer import base_eval, base_train, chat_eval, checkpoint
from trainer.execution import containment
from trainer.tasks import CHAT_TASKS

from conftest import copy_tokenizer

TINY = (
    "--depth 2 --head-dim 64 --max-seq-len 128 --device-batch-size 4 --total-batch-size 1024 "
    "--eval-tokens 2048 --sample-every 0 --core-metric-every -1 --warmup-steps 2 --num-iterations 6 "
    "--eval-every 3"
)


@pytest.fixture(scope="module")
def trained(kit_base: Path, data_kit: Path) -> Path:
    """Run 'e': the kit tokenizer and a base model trained for 6 steps."""
    copy_tokenizer(kit_base, "e")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOCHAT_BASE_DIR", str(kit_base))
        patch.setenv("NANOCHAT_DATA_DIR", str(data_kit))
        base_train.main(["--run", "e", *TINY.split()])
    return kit_base


@pytest.fixture
def env(trained: Path, env: Path) -> Path:
    return env


def report(base: Path) -> Path:
    return base / "runs" / "e" / "report"


def test_base_eval_reports_core_bpb_and_samples(env: Path) -> None:
    args = ["--run", "e", "--max-per-task", "3", "--split-tokens", "2048", "--device-batch-size", "4"]
    summary = base_eval.main(args)
    assert summary["step"] == 6 and summary["core_tasks"] == "core_offline.yaml"  # the kit has 20 of the 22
    per_task = summary["core_per_task"]
    assert len(per_task) == 20 and all(0 <= r["accuracy"] <= 1 for r in per_task.values())
    centered = [r["centered"] for r in per_task.values()]
    assert summary["core"] == pytest.approx(sum(centered) / 20, abs=1e-3)
    trained = json.loads((report(env) / "base_train.json").read_text())
    assert summary["val_bpb"] == trained["val_bpb"]  # the same model on the same 2,048 tokens
    assert len(summary["samples"]["greedy"]) == len(base_train.SAMPLE_PROMPTS)
    assert summary["samples"]["greedy"][0].startswith(base_train.SAMPLE_PROMPTS[0])
    card = (report(env) / "report.md").read_text()
    assert f"| BASE | {summary['core']:.4f} |" in card and "![val_bpb](val_bpb.png)" in card
    assert (report(env) / "val_bpb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_off_cuda_base_eval_reads_per_split_half_the_tokens_the_model_trained_on(
    env: Path, capsys: pytest.CaptureFixture
) -> None:
    summary = base_eval.main(["--run", "e", "--eval", "bpb", "--device-batch-size", "4"])
    out = capsys.readouterr().out  # the model trained 6 steps × 1,024 tokens
    assert "eval budget: --split-tokens 3,072 (sized to this cpu run: as many tokens as the model" in out
    assert summary["val_bpb"] > 0 and summary["train_bpb"] > 0


def test_base_eval_refuses_unknown_evals(env: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        base_eval.main(["--run", "e", "--eval", "core,vibes"])
    assert exit_info.value.code == 2


def test_chat_eval_scores_every_task_and_chatcore(env: Path) -> None:
    base, sft = env / "runs" / "e" / "base", env / "runs" / "e" / "sft"
    shutil.copytree(checkpoint.step_dir(base, 6), checkpoint.step_dir(sft, 6))  # stands in for an SFT model
    summary = chat_eval.main(["--run", "e", "-i", "sft", "--max-problems", "4", "-m", "8", "-b", "3"])
    assert summary["source"] == "sft" and summary["step"] == 6 and summary["max_problems"] == 4
    assert set(CHAT_TASKS) <= set(summary) and all(summary[t] in (0, 0.25, 0.5, 0.75, 1) for t in CHAT_TASKS)
    baselines = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
    expected = sum((summary[t] - b) / (1 - b) for t, b in baselines.items()) / 5
    assert summary["chatcore"] == pytest.approx(expected, abs=1e-4)
    markdown = (report(env) / "report.md").read_text()
    assert f"| SFT | – | {summary['ARC-Easy']:.4f} |" in markdown
    section = json.loads((report(env) / "chat_eval_sft.json").read_text())
    assert section["sandbox"] == containment() and "landlock_filesystem" in markdown


def test_chat_eval_needs_a_checkpoint_of_the_stage(env: Path) -> None:
    with pytest.raises(SystemExit, match=r"no checkpoint in .*rl"):
        chat_eval.main(["--run", "e", "-i", "rl", "-a", "ARC-Easy"])
