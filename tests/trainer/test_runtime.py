"""Where a run goes: a GPU machine whose driver is too old for torch's CUDA line is said so, not
silently trained on the CPU; bfloat16 on a CPU that would run it tens of times slower is said so too."""

import os
from pathlib import Path

import pytest
import torch

from trainer import runtime
from trainer.runtime import setup_runtime


def fake_nvidia_smi(folder: Path, driver: str) -> str:
    """A PATH whose nvidia-smi reports one GPU with this driver version."""
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\necho {driver}\n")
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_a_driver_too_old_for_torchs_cuda_line_stops_the_run_with_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin", "570.86.15"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA 13.0 build of torch ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # ... that the old driver cannot run
    with pytest.raises(SystemExit) as stop:
        setup_runtime("auto")
    message = str(stop.value)
    assert "NVIDIA driver 570.86.15 is older than the 580.65.06 it needs" in message
    assert "TORCH_CUDA=cu126" in message


def test_a_machine_without_nvidia_gpus_runs_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert setup_runtime("auto").device == torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_on_a_cpu_without_native_bfloat16_matmuls_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, native: bool
) -> None:
    monkeypatch.setattr(runtime, "cpu_has_bfloat16_matmul", lambda: native)
    assert setup_runtime("cpu", "bfloat16").dtype == torch.bfloat16
    warned = "no native bfloat16 matmul" in capsys.readouterr().out
    assert warned is not native
    setup_runtime("cpu", "float32")
    assert "bfloat16" not in capsys.readouterr().out
