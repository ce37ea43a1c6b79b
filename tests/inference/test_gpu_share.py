"""The model server shares the machine's GPUs with training jobs (jobs.gpu_claims): it serves on the last
GPU and marks it in Redis; when a job's mark appears there, it lets running replies finish, unloads its
models, takes its mark off and answers 503 gpu_busy until the job has ended. A real `python -m
inference` on a machine whose GPUs come from a fake nvidia-smi on PATH (it computes on the CPU)."""

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from jobs import gpu_claims
from redis import Redis

from tests.inference.conftest import AUTH_HEADER, start_server
from tests.support import fake_nvidia_smi, wait_until

SERVED_GPU = "GPU-b"  # the last of the machine's two
JOB = "0123456789abcdef0123456789abcdef"
QUICK = {"model": "slow-sft", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def shared(
    slow_base: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Redis]]:
    """The server's URL, and a client on the Redis it shares its GPU through."""
    workdir = tmp_path_factory.mktemp("inference-gpu-share")
    redis = Redis.from_url(redis_url)
    path = fake_nvidia_smi(workdir / "bin", "GPU-a", SERVED_GPU)
    process, url = start_server(slow_base, workdir, REDIS_URL=redis_url, PATH=path)
    try:
        yield url, redis
    finally:
        process.stop()
        redis.delete(gpu_claims.job_key(SERVED_GPU))
        redis.close()


def readiness(server: str) -> str:
    return httpx.get(f"{server}/ready", headers=AUTH_HEADER).json()["status"]


@pytest.fixture
def job_on_its_gpu(shared: tuple[str, Redis]) -> Iterator[None]:
    """A training job's program comes to the server's GPU (its worker marks it); it is gone afterwards."""
    server, redis = shared
    redis.set(gpu_claims.job_key(SERVED_GPU), JOB, ex=300)
    yield
    redis.delete(gpu_claims.job_key(SERVED_GPU))
    wait_until(lambda: readiness(server) != "paused", 10, "the server to serve again")


def test_the_server_serves_on_the_last_gpu_and_marks_it(shared: tuple[str, Redis]) -> None:
    _, redis = shared
    assert redis.exists(gpu_claims.server_key(SERVED_GPU))  # the warm-up loaded the default model there
    assert not redis.exists(gpu_claims.server_key("GPU-a"))  # the first GPU is left to the jobs


def test_a_running_reply_finishes_before_the_server_lets_go(shared: tuple[str, Redis]) -> None:
    server, redis = shared
    request = {**QUICK, "max_tokens": 120, "temperature": 0, "stream": True}
    finish_reason = None
    with (
        httpx.Client(base_url=server, headers=AUTH_HEADER, timeout=120) as client,
        client.stream("POST", "/v1/chat/completions", json=request) as stream,
    ):
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # the reply runs
        redis.set(gpu_claims.job_key(SERVED_GPU), JOB, ex=300)  # and now a job needs the GPU
        try:
            for line in lines:
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    assert redis.exists(gpu_claims.server_key(SERVED_GPU)), "let go while a reply ran"
                    finish_reason = chunk["choices"][0]["finish_reason"] or finish_reason
            assert finish_reason == "length"  # all 120 tokens: the reply was not cut short
            wait_until(
                lambda: not redis.exists(gpu_claims.server_key(SERVED_GPU)), 10, "the server to let go"
            )
        finally:
            redis.delete(gpu_claims.job_key(SERVED_GPU))
    wait_until(lambda: readiness(server) != "paused", 10, "the server to serve again")


def test_while_a_job_holds_its_gpu_the_server_answers_503_gpu_busy(
    shared: tuple[str, Redis], job_on_its_gpu: None
) -> None:
    server, redis = shared
    wait_until(lambda: readiness(server) == "paused", 10, "the server to make way")
    assert not redis.exists(gpu_claims.server_key(SERVED_GPU))
    refused = httpx.post(f"{server}/v1/chat/completions", json=QUICK, headers=AUTH_HEADER)
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "gpu_busy" and error["type"] == "server_error"
    assert JOB in error["message"] and "INFERENCE_GPUS" in error["message"]  # which job, and the way out
    assert int(refused.headers["retry-after"]) > 0
    ready = httpx.get(f"{server}/ready", headers=AUTH_HEADER)
    assert ready.status_code == 503 and ready.json() == {"status": "paused", "job": JOB}
    assert "inference_paused 1.0" in httpx.get(f"{server}/metrics", headers=AUTH_HEADER).text


def test_once_the_job_has_ended_the_server_loads_its_model_again(
    shared: tuple[str, Redis], job_on_its_gpu: None
) -> None:
    server, redis = shared
    wait_until(lambda: readiness(server) == "paused", 10, "the server to make way")
    redis.delete(gpu_claims.job_key(SERVED_GPU))  # the job's program has ended
    wait_until(lambda: readiness(server) != "paused", 10, "the server to serve again")
    assert readiness(server) == "loading"  # its models were unloaded: none is loaded yet
    assert "inference_paused 0.0" in httpx.get(f"{server}/metrics", headers=AUTH_HEADER).text
    reply = httpx.post(f"{server}/v1/chat/completions", json=QUICK, headers=AUTH_HEADER, timeout=60)
    assert reply.status_code == 200
    assert redis.exists(gpu_claims.server_key(SERVED_GPU))  # marked again before it loaded
