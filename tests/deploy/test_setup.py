"""`make setup` is idempotent: run again on a set-up machine it changes nothing and succeeds quickly."""

import subprocess

import pytest

from support import ROOT


def test_setup_again_is_a_no_op() -> None:
    result = subprocess.run(["scripts/setup.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "setup ok" in result.stdout
    assert "Installing" not in result.stdout + result.stderr


def test_torch_installer_keeps_the_installed_cpu_build() -> None:
    result = subprocess.run(
        ["scripts/install_torch.sh"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHON": ".venv/bin/python", "TORCH_VARIANT": "cpu"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "torch 2.13.0 (cpu) is already installed" in result.stdout


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"TORCH_VARIANT": "rocm"}, "must be auto, cpu or cuda"),
        ({"TORCH_CUDA": "cu999"}, "must be cu126 or cu130"),
    ],
)
def test_torch_installer_refuses_an_unknown_variant_or_cuda_line(setting: dict, message: str) -> None:
    result = subprocess.run(
        ["scripts/install_torch.sh"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "TORCH_VARIANT": "cuda", **setting},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and message in result.stderr
