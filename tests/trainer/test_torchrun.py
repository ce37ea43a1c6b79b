"""base_train under torchrun: two CPU processes (gloo) train one model and write per-rank state."""

import subprocess
from pathlib import Path

import pytest

from trainer import checkpoint, tok_train

from support import PYTHON, service_env

FLAGS = [
    *("--run", "ddp", "--depth", "2", "--head-dim", "64", "--max-seq-len", "64"),
    *("--device-batch-size", "2", "--total-batch-size", "256", "--num-iterations", "4"),
    *("--eval-every", "2", "--eval-tokens", "512", "--sample-every", "0", "--save-every", "2"),
    *("--core-metric-every", "4", "--core-metric-max-per-task", "2"),  # CORE's examples split over ranks
]
TORCHRUN = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def test_two_process_training_writes_per_rank_state_and_resumes_only_with_two(
    data_kit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(data_kit))
    tok_train.main(["--run", "ddp", "--vocab-size", "1024"])
    env = service_env(NANOCHAT_BASE_DIR=str(tmp_path), NANOCHAT_DATA_DIR=str(data_kit), OMP_NUM_THREADS="1")

    def run(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    trained = run([*TORCHRUN, "-m", "trainer.base_train", "--", *FLAGS])
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "cpu × 2 process(es)" in trained.stdout and "base_train done" in trained.stdout
    assert "step 4/4 | CORE" in trained.stdout
    out = tmp_path / "runs" / "ddp" / "base"
    assert checkpoint.list_steps(out) == [2, 4]
    files = sorted(p.name for p in checkpoint.step_dir(out, 4).iterdir())
    assert files == ["meta.json", "model.safetensors", "rank00.pt", "rank01.pt"]

    resumed = run([*TORCHRUN, "-m", "trainer.base_train", "--", *FLAGS, "--resume-from-step", "2"])
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout
    single = run([PYTHON, "-m", "trainer.base_train", *FLAGS, "--resume-from-step", "2"])
    assert single.returncode != 0 and "resume it with as many" in single.stderr
