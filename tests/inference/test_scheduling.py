"""The scheduler's limits, seen from outside: a full queue answers 429, a client that leaves frees its
row at once, and idle models leave memory to the ones in use."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inference.metrics import Metrics
from inference.pool import ModelPool
from inference.settings import InferenceSettings
from tests.inference.conftest import AUTH_HEADER, start_server

LONG = {
    "model": "slow-sft",
    "messages": [{"role": "user", "content": "Go on forever"}],
    "max_tokens": 8000,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def small_server(slow_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A slow model with one batch row and one waiting place."""
    process, url = start_server(
        slow_base,
        tmp_path_factory.mktemp("inference-small"),
        INFERENCE_MAX_BATCH_SIZE="1",
        INFERENCE_MAX_WAITING="1",
    )
    yield url
    process.stop()


def metric(server: str, name: str) -> float:
    lines = httpx.get(f"{server}/metrics", headers=AUTH_HEADER).text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name))


def first_token(stream: httpx.Response) -> Iterator[str]:
    """Read the stream up to its first generated text: from then on the request holds a batch row.
    The caller keeps the returned line iterator: closing it would close the connection."""
    lines = stream.iter_lines()
    for line in lines:
        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            return lines
    raise AssertionError("the stream ended before its first token")


@pytest.fixture(autouse=True)
def idle(small_server: str) -> None:
    """Each test starts on an idle server (the streams of the one before have been dropped)."""
    deadline = time.monotonic() + 10
    while metric(small_server, "inference_running_sequences") or metric(
        small_server, "inference_queue_depth"
    ):
        assert time.monotonic() < deadline, "the server never went idle"
        time.sleep(0.05)


def test_a_full_queue_answers_429_with_retry_after(small_server: str) -> None:
    with (
        httpx.Client(base_url=small_server, headers=AUTH_HEADER, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as running,
    ):
        _open = first_token(running)  # it holds the only batch row while this is open
        with client.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as waiting:
            assert waiting.status_code == 200  # it takes the only waiting place
            state = (
                metric(small_server, "inference_running_sequences"),
                metric(small_server, "inference_queue_depth"),
            )
            assert state == (1, 1), f"running, waiting = {state}"
            refused = client.post("/v1/chat/completions", json=LONG)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert metric(small_server, "inference_rejected_requests_total") >= 1


def test_a_client_that_disconnects_frees_its_row(small_server: str) -> None:
    before = metric(small_server, "inference_generation_tokens_total")
    with (
        httpx.Client(base_url=small_server, headers=AUTH_HEADER, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as stream,
    ):
        lines = first_token(stream)
    del lines  # the client is gone
    deadline = time.monotonic() + 5
    while metric(small_server, "inference_running_sequences") > 0:
        assert time.monotonic() < deadline, "the disconnected stream still holds its row"
        time.sleep(0.05)
    generated = metric(small_server, "inference_generation_tokens_total") - before
    assert generated < LONG["max_tokens"]  # it stopped early, not at max_tokens
    # the freed row serves the next request at once
    reply = httpx.post(
        f"{small_server}/v1/chat/completions", json={**LONG, "max_tokens": 2}, headers=AUTH_HEADER
    )
    assert reply.status_code == 200


def test_idle_models_are_unloaded_past_the_memory_budget(served_base: Path, monkeypatch) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(served_base))
    settings = InferenceSettings(dev_mode=True, inference_device="cpu", inference_max_model_memory_gb=1e-6)
    pool = ModelPool(settings, Metrics())
    try:
        first = pool.get("tiny-sft-000005")
        assert pool.get("tiny-sft-000005") is first  # loaded once
        pool.get("tiny-base")
        assert list(pool.loaded) == ["tiny-base-000003"]  # the idle one made room
        assert first.scheduler.closed
    finally:
        pool.unload_all()
