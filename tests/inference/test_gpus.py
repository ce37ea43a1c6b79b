"""On a machine with several GPUs, the model server uses the ones it is given, not the worker's."""

import os

import pytest
import uvicorn

from inference.__main__ import main


def test_the_model_server_sees_only_its_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")  # the container's view (restored after)
    monkeypatch.setenv("INFERENCE_GPUS", "7")
    monkeypatch.setenv("DEV_MODE", "1")
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: None)  # start nothing
    main()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
