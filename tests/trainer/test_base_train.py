"""base_train on the data kit: loss falls, resume is bitwise exact, and saves are crash-safe."""

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer import base_train, checkpoint, tok_train

from support import PYTHON, service_env, wait_until

# A depth-2 model on 128-token rows: each step is a few hundredths of a second on a CPU.
TINY = "--depth 2 --head-dim 64 --max-seq-len 128 --device-batch-size 4 --total-batch-size 1024 "
TINY += "--eval-tokens 4096 --sample-every 0 --warmup-steps 5"


@pytest.fixture(scope="module")
def base_dir(data_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base dir with a trained tokenizer for run 'r' (vocab 2048)."""
    base = tmp_path_factory.mktemp("base")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOCHAT_BASE_DIR", str(base))
        patch.setenv("NANOCHAT_DATA_DIR", str(data_kit))
        tok_train.main(["--run", "r", "--vocab-size", "2048"])
    return base


@pytest.fixture
def env(base_dir: Path, data_kit: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base_dir))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(data_kit))
    return base_dir


def run_dir(base: Path, run: str) -> Path:
    return base / "runs" / run


def copy_tokenizer(base: Path, run: str) -> None:
    shutil.copytree(run_dir(base, "r") / "tokenizer", run_dir(base, run) / "tokenizer", dirs_exist_ok=True)


def train(base: Path, run: str, flags: str) -> dict:
    """base_train.main for `run` (given the shared tokenizer) with the tiny config plus `flags`."""
    copy_tokenizer(base, run)
    return base_train.main(["--run", run, *TINY.split(), *flags.split()])


def metrics(base: Path, run: str) -> list[dict]:
    return [
        json.loads(line) for line in (run_dir(base, run) / "base" / "metrics.jsonl").read_text().splitlines()
    ]


def weights(base: Path, run: str, step: int) -> dict[str, torch.Tensor]:
    return load_file(checkpoint.step_dir(run_dir(base, run) / "base", step) / "model.safetensors")


def test_loss_falls_on_real_text(env: Path) -> None:
    summary = train(env, "learn", "--num-iterations 40 --eval-every 20 --matrix-lr 0.04 --weight-decay 0")
    records = metrics(env, "learn")
    losses = [r["loss"] for r in records if "loss" in r]
    bpbs = [r["val_bpb"] for r in records if "val_bpb" in r]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert bpbs[-1] < bpbs[0] - 0.25 and summary["val_bpb"] == pytest.approx(bpbs[-1], abs=1e-4)
    report = run_dir(env, "learn") / "report"
    summary_file = json.loads((report / "base_train.json").read_text())
    assert summary_file["steps"] == 40 and summary_file["depth"] == 2
    assert "![base_train_loss](base_train_loss.svg)" in (report / "report.md").read_text()
    assert (report / "base_train_val_bpb.svg").read_text().count("<polyline") == 1


def test_architecture_switches_and_gqa_train(env: Path) -> None:
    flags = "--no-value-embeds --no-smear --no-backout --n-kv-head 1 --window-pattern SL --softcap 30"
    summary = train(env, "plain", f"--num-iterations 3 --eval-every 0 {flags}")
    assert summary["steps"] == 3 and summary["val_bpb"] < 5
    meta = json.loads((checkpoint.step_dir(run_dir(env, "plain") / "base", 3) / "meta.json").read_text())
    config = meta["model_config"]
    assert (config["value_embeds"], config["smear"], config["backout"], config["n_kv_head"]) == (
        False,
        False,
        False,
        1,
    )
    model, _ = checkpoint.load_model(run_dir(env, "plain") / "base", 3, torch.device("cpu"), torch.float32)
    assert not model.value_embeds and model.smear_gate is None and model.backout_lambda is None


def test_interrupted_then_resumed_run_equals_uninterrupted_run_bitwise(env: Path) -> None:
    common = "--num-iterations 12 --eval-every 0 --save-every 6 --keep-checkpoints 5"
    train(env, "straight", common)
    # The resumed run starts from the uninterrupted run's step-6 checkpoint and its metrics so far.
    shutil.copytree(
        checkpoint.step_dir(run_dir(env, "straight") / "base", 6),
        checkpoint.step_dir(run_dir(env, "resumed") / "base", 6),
    )
    shutil.copy(run_dir(env, "straight") / "base" / "metrics.jsonl", run_dir(env, "resumed") / "base")
    train(env, "resumed", f"{common} --resume")
    straight, resumed = weights(env, "straight", 12), weights(env, "resumed", 12)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    def losses(run: str) -> list[tuple]:
        return [(r["step"], r["loss"], r["lrm"]) for r in metrics(env, run) if "loss" in r]

    assert len(losses("straight")) == 12 and losses("resumed") == losses("straight")


def test_crash_while_saving_leaves_the_previous_checkpoint_usable(
    env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    common = "--num-iterations 6 --eval-every 0 --save-every 3"
    real_save_file = checkpoint.save_file
    calls = []

    def crash_on_second_save(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            real_save_file(dict(list(tensors.items())[:2]), path)  # half written, then the process dies
            raise OSError("disk full")
        real_save_file(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", crash_on_second_save)
    with pytest.raises(OSError, match="disk full"):
        train(env, "crash", common)
    out = run_dir(env, "crash") / "base"
    assert checkpoint.list_steps(out) == [3]
    model, meta = checkpoint.load_model(out, 3, torch.device("cpu"), torch.float32)
    assert meta["step"] == 3 and model.config.n_layer == 2
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    summary = train(env, "crash", f"{common} --resume")  # picks up at step 3 and finishes
    assert summary["steps"] == 6 and checkpoint.list_steps(out) == [3, 6]
    assert not list(out.glob(".*tmp"))  # the half-written temp folder was cleaned up


def test_only_the_last_k_checkpoints_are_kept(env: Path) -> None:
    train(env, "keep", "--num-iterations 5 --eval-every 0 --save-every 1 --keep-checkpoints 2")
    assert checkpoint.list_steps(run_dir(env, "keep") / "base") == [4, 5]


def run_until_sigterm(command: list[str], env: dict, log: Path, after: str) -> str:
    """Start base_train, SIGTERM it once `after` is in its output, return the output (exit code 143)."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: after in log.read_text() or process.poll() is not None, 120, after)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 143, log.read_text()[-3000:]
        finally:
            if process.poll() is None:
                process.kill()
    return log.read_text()


def test_sigterm_saves_a_checkpoint_and_resume_continues_from_it(
    env: Path, data_kit: Path, tmp_path: Path
) -> None:
    copy_tokenizer(env, "signal")
    out = run_dir(env, "signal") / "base"
    flags = f"--run signal {TINY} --num-iterations 400 --eval-every 0 --save-every 0"
    command = [PYTHON, "-m", "trainer.base_train", *flags.split()]
    process_env = service_env(NANOCHAT_BASE_DIR=str(env), NANOCHAT_DATA_DIR=str(data_kit))
    output = run_until_sigterm(command, process_env, tmp_path / "first.log", after="step 3/400")
    (first,) = checkpoint.list_steps(out)
    assert 3 <= first < 400 and f"checkpoint {checkpoint.step_dir(out, first)}" in output
    assert "stopped at step" in output and "resume with --resume" in output

    output = run_until_sigterm(
        [*command, "--resume"], process_env, tmp_path / "second.log", after=f"step {first + 2}/400"
    )
    assert f"resumed from {checkpoint.step_dir(out, first)}" in output
    assert f"step {first + 1}/400 | loss" in output and "step 1/400 | loss" not in output
    assert checkpoint.list_steps(out)[-1] > first
