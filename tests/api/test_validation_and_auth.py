"""Bad input and missing credentials are refused before anything reaches the queue (no worker runs here)."""

import subprocess

import httpx
import pytest
from rq import Queue

from worker.queue import QUEUE_NAME
from worker.records import JOBS_INDEX

from conftest import Stack
from support import PYTHON, Process, free_port, service_env

VALID = {"kind": "tokenizer", "run": "checks", "config": {"vocab_size": 4096}}


def queue_length(stack: Stack) -> int:
    return len(Queue(QUEUE_NAME, connection=stack.redis))


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({**VALID, "config": {"vocab_size": 255}}, "vocab_size"),
        ({**VALID, "config": {"vocab_size": 2**17 + 1}}, "vocab_size"),
        ({**VALID, "config": {"vocab_size": "big"}}, "vocab_size"),
        ({**VALID, "config": {"max_chars": -1}}, "max_chars"),
        ({**VALID, "config": {"doc_cap": 10**9}}, "doc_cap"),
        ({**VALID, "config": {"vocab_size": 4096, "merges": 3}}, "merges"),
        ({**VALID, "priority": "high"}, "priority"),
        ({**VALID, "run": "../../etc"}, "run"),
        ({**VALID, "run": ""}, "run"),
        ({**VALID, "kind": "mine-bitcoin"}, "kind"),
        ({"run": "x"}, "kind"),
    ],
)
def test_invalid_spec_is_422_naming_the_field_and_enqueues_nothing(
    api_only: Stack, spec: dict, field: str
) -> None:
    jobs_before = api_only.redis.zcard(JOBS_INDEX)
    with api_only.client() as client:
        response = client.post("/jobs", json=spec)
    assert response.status_code == 422
    # The field is in the error's location, or (for the job kind, the union's tag) named in its message.
    errors = response.json()["detail"]
    assert any(field in map(str, e["loc"]) or f"'{field}'" in e["msg"] for e in errors), errors
    assert queue_length(api_only) == 0
    assert api_only.redis.zcard(JOBS_INDEX) == jobs_before


def mutating_routes(client: httpx.Client) -> list[tuple[str, str]]:
    paths = client.get("/openapi.json").json()["paths"]
    return [
        (method.upper(), path)
        for path, ops in paths.items()
        for method in ops
        if method not in ("get", "head")
    ]


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token", ""])
def test_every_mutating_route_refuses_a_missing_or_wrong_token(api_only: Stack, token: str | None) -> None:
    with api_only.client(token=token) as client:
        routes = mutating_routes(client)
        assert ("POST", "/jobs") in routes and ("POST", "/jobs/{job_id}/cancel") in routes
        for method, path in routes:
            response = client.request(method, path.replace("{job_id}", "some-id"), json=VALID)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    assert queue_length(api_only) == 0


def test_queued_job_can_be_canceled_once(api_only: Stack) -> None:
    with api_only.client() as client:
        job = client.post("/jobs", json=VALID).json()
        assert job["status"] == "queued" and queue_length(api_only) == 1
        canceled = client.post(f"/jobs/{job['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        assert canceled.json()["ended_at"] is not None
        assert queue_length(api_only) == 0  # gone from RQ's queue too
        again = client.post(f"/jobs/{job['id']}/cancel")
        assert again.status_code == 409 and "already ended" in again.json()["detail"]
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "canceled"


def test_unknown_job_is_404_everywhere(api_only: Stack) -> None:
    with api_only.client() as client:
        assert client.get("/jobs/nope").status_code == 404
        assert client.get("/jobs/nope/logs").status_code == 404
        assert client.get("/jobs/nope/logs?follow=true").status_code == 404
        assert client.post("/jobs/nope/cancel").status_code == 404


def run_api(tmp_path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "api"],
        env=service_env(API_PORT=str(free_port()), **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({}, "API_TOKEN is not set"),
        ({"API_TOKEN": "change-me"}, "placeholder"),
        ({"API_TOKEN": "short"}, "shorter than 16"),
    ],
)
def test_api_refuses_to_start_without_a_real_token(tmp_path, env: dict, reason: str) -> None:
    result = run_api(tmp_path, **env)
    assert result.returncode != 0
    assert "refusing to start" in result.stderr and reason in result.stderr


def test_dev_mode_starts_without_a_token_and_lets_requests_through(redis_url: str, tmp_path) -> None:
    port = free_port()
    api = Process(
        "api",
        [PYTHON, "-m", "api"],
        service_env(DEV_MODE="1", API_PORT=str(port), REDIS_URL=redis_url),
        tmp_path,
    )
    try:
        api.wait_healthy(f"http://127.0.0.1:{port}/health")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            job = client.post("/jobs", json=VALID)
            assert job.status_code == 201
            assert client.post(f"/jobs/{job.json()['id']}/cancel").json()["status"] == "canceled"
    finally:
        api.stop()
