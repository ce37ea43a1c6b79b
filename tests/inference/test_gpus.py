"""On a machine with several GPUs the model server serves on the last one (jobs take theirs from the
first), or on those INFERENCE_GPUS names; it numbers them as nvidia-smi does."""

import os
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import uvicorn

from inference.__main__ import main
from tests.support import fake_nvidia_smi


@pytest.fixture(autouse=True)
def started_without_serving(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """main() picks the GPUs and starts nothing; what it sets in the environment is undone after (a
    variable it sets that was not there before included: monkeypatch alone would leave it)."""
    with mock.patch.dict(os.environ):
        for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
            os.environ.pop(name, None)
        monkeypatch.setenv("DEV_MODE", "1")
        monkeypatch.setattr(uvicorn, "run", lambda app, **options: None)
        yield


def gpus(monkeypatch: pytest.MonkeyPatch, folder: Path, count: int) -> None:
    monkeypatch.setenv("PATH", fake_nvidia_smi(folder, *(f"GPU-{i}" for i in range(count))))


def test_by_default_the_model_server_serves_on_the_last_gpu(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gpus(monkeypatch, tmp_path, 8)
    main()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # CUDA's 7 is nvidia-smi's 7


def test_the_model_server_sees_only_its_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gpus(monkeypatch, tmp_path, 8)
    monkeypatch.setenv("INFERENCE_GPUS", "0")
    main()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_a_process_given_some_gpus_serves_on_the_last_of_those(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gpus(monkeypatch, tmp_path, 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    main()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"


def test_on_one_gpu_the_model_server_serves_on_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gpus(monkeypatch, tmp_path, 1)
    main()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"


def test_a_machine_without_gpus_is_left_as_it_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    main()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
