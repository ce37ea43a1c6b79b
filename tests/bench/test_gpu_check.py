"""bench/gpu_check.sh, the one script a GPU machine runs, works end to end: here every part runs tiny on
the CPU (--smoke), so the day a GPU is lent the only new thing is the GPU."""

import json
import subprocess
from pathlib import Path

from support import ROOT, service_env

PARTS = ["gpu-tests", "d12", "d20", "fp8", "fp16", "torchrun", "inference", "inference-graphs"]


def gpu_check(*options: str, data_kit: Path) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run(
        ["bench/gpu_check.sh", "--smoke", *options],
        cwd=ROOT,
        env=service_env(NANOCHAT_DATA_DIR=str(data_kit)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    return result, json.loads(result.stdout.strip().splitlines()[-1])


def test_the_gpu_check_runs_every_part_and_ends_with_one_json_line(data_kit, tmp_path) -> None:
    result, summary = gpu_check("--out", str(tmp_path), data_kit=data_kit)
    assert result.returncode == 0 and summary["ok"], result.stdout[-3000:]
    parts = summary["parts"]
    assert list(parts) == PARTS
    assert parts["d12"]["tok_per_s"] > 0 and parts["d12"]["attention"].startswith("sdpa (")
    assert parts["fp8"]["fp8"] and not parts["d20"]["fp8"] and parts["fp8"]["tok_per_s"] > 0
    assert parts["fp16"]["dtype"] == "float16" and parts["torchrun"]["device"] == "cpu × 2"
    assert parts["torchrun"]["backend"].startswith("gloo")
    assert {row["concurrency"] for row in parts["inference"]["results"]} == {1, 2}
    assert [row["concurrency"] for row in parts["inference-graphs"]["results"]] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{name}.log" for name in [*PARTS, "tokenizer"]
    )


def test_the_gpu_check_runs_only_the_parts_asked_for(data_kit, tmp_path) -> None:
    """A rerun of one part, within a device's time: no tokenizer, no training, only that part."""
    result, summary = gpu_check("--out", str(tmp_path), "--parts", "gpu-tests", data_kit=data_kit)
    assert result.returncode == 0 and summary["ok"], result.stdout[-3000:]
    assert list(summary["parts"]) == ["gpu-tests"]
    assert [p.name for p in tmp_path.iterdir()] == ["gpu-tests.log"]
