"""Bad input and missing credentials are refused before anything reaches the queue (no worker runs here)."""

import contextlib
import json
import math
import pickle
import subprocess
import zlib
from pathlib import Path

import httpx
import pytest
from jobs.queue import SERIALIZER
from jobs.records import JOBS_INDEX
from rq.exceptions import DeserializationError
from rq.job import Job

from conftest import Stack
from support import PYTHON, Process, free_port, service_env

VALID = {"kind": "tokenizer", "run": "checks", "config": {"vocab_size": 4096}}


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
    assert api_only.queue_length() == 0
    assert api_only.redis.zcard(JOBS_INDEX) == jobs_before


def protected_routes(client: httpx.Client) -> list[tuple[str, str]]:
    paths = client.get("/openapi.json").json()["paths"]
    return [(method.upper(), path) for path, ops in paths.items() for method in ops if path != "/health"]


UNKNOWN_ID = "0" * 32


@pytest.mark.parametrize("token", [None, "wrong-token-wrong-token", ""])
def test_every_route_but_health_refuses_a_missing_or_wrong_token(api_only: Stack, token: str | None) -> None:
    with api_only.client(token=token) as client:
        routes = protected_routes(client)
        assert {("POST", "/jobs"), ("GET", "/jobs"), ("GET", "/jobs/{job_id}/logs")} <= set(routes)
        for method, path in routes:
            response = client.request(method, path.replace("{job_id}", UNKNOWN_ID), json=VALID)
            assert response.status_code == 401, (method, path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
        assert client.get("/health").status_code == 200
    assert api_only.queue_length() == 0


def test_openapi_documents_the_statuses_each_route_returns(api_only: Stack) -> None:
    with api_only.client() as client:
        paths = client.get("/openapi.json").json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            documented = set(operation["responses"])
            if path != "/health":
                assert {"401", "422", "503"} <= documented, (method, path)
            if "{job_id}" in path:
                assert "404" in documented, (method, path)
    assert "409" in paths["/jobs"]["post"]["responses"]
    assert "413" in paths["/jobs"]["post"]["responses"]
    assert {"400", "429"} <= set(paths["/jobs/{job_id}/logs"]["get"]["responses"])


def test_nanochats_flags_and_its_off_value_are_accepted(api_only: Stack) -> None:
    """Every base_train flag is a config field (tests/jobs/test_specs.py), -1 turns an evaluation off."""
    spec = {"kind": "base_train", "run": "flags", "config": {"matrix_lr": 0.03, "eval_every": -1}}
    with api_only.client() as client:
        response = client.post("/jobs", json=spec)
        assert response.status_code == 201, response.text
        assert response.json()["config"]["matrix_lr"] == 0.03
        client.post(f"/jobs/{response.json()['id']}/stop")
    assert api_only.queue_length() == 0


def test_queued_job_can_be_stopped_once(api_only: Stack) -> None:
    with api_only.client() as client:
        job = client.post("/jobs", json=VALID).json()
        assert job["status"] == "queued" and api_only.queue_length() == 1
        canceled = client.post(f"/jobs/{job['id']}/stop")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        assert canceled.json()["ended_at"] is not None
        assert api_only.queue_length() == 0  # gone from RQ's queue too
        again = client.post(f"/jobs/{job['id']}/cancel")  # the alias
        assert again.status_code == 409 and "already ended" in again.json()["detail"]
        assert client.get(f"/jobs/{job['id']}").json()["status"] == "canceled"
        assert client.delete(f"/jobs/{job['id']}").status_code == 204
        assert client.get(f"/jobs/{job['id']}").status_code == 404


def test_a_second_job_on_the_same_run_and_stage_is_refused(api_only: Stack) -> None:
    with api_only.client() as client:
        first = client.post("/jobs", json={**VALID, "run": "busy"}).json()
        second = client.post("/jobs", json={**VALID, "run": "busy"})
        assert second.status_code == 409 and first["id"] in second.json()["detail"]
        assert client.delete(f"/jobs/{first['id']}").status_code == 409  # still active
        client.post(f"/jobs/{first['id']}/stop")
        assert client.post("/jobs", json={**VALID, "run": "busy"}).status_code == 201


def test_unknown_or_malformed_job_ids(api_only: Stack) -> None:
    with api_only.client() as client:
        for method, path in [("GET", ""), ("GET", "/logs"), ("GET", "/logs?follow=true"), ("GET", "/metrics"),
                             ("POST", "/stop"), ("POST", "/retry"), ("DELETE", "")]:  # fmt: skip
            assert client.request(method, f"/jobs/{UNKNOWN_ID}{path}").status_code == 404, path
            assert client.request(method, f"/jobs/..%2F..%2Fetc{path}").status_code in (404, 422), path
            assert client.request(method, f"/jobs/{'a' * 31}{path}").status_code == 422, path


def test_an_oversize_body_is_413(api_only: Stack) -> None:
    padding = "x" * 2_000_000
    with api_only.client() as client:
        response = client.post("/jobs", json={**VALID, "run": padding})
        assert response.status_code == 413

        def chunks():  # no Content-Length: counted as it arrives
            yield b'{"kind": "tokenizer", "run": "'
            for _ in range(40):
                yield b"x" * 50_000
            yield b'"}'

        response = client.post("/jobs", content=chunks(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413


def test_the_schema_route_describes_every_kind(api_only: Stack) -> None:
    with api_only.client() as client:
        schemas = client.get("/jobs/schema").json()
    assert {
        "tokenizer",
        "base_train",
        "mid_train",
        "chat_sft",
        "chat_rl",
        "base_eval",
        "chat_eval",
        "export",
        "import",
        "validate_file",
        "pipeline",
    } == set(schemas)
    assert schemas["tokenizer"]["$defs"]["TokenizerConfig"]["properties"]["vocab_size"]["minimum"] == 265


def test_a_pickled_payload_in_redis_is_never_executed(api_only: Stack, tmp_path) -> None:
    """RQ's queue holds JSON (the job id); a pickled job someone plants is not run, only refused."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with api_only.client() as client:
        job = client.post("/jobs", json={**VALID, "run": "pickle"}).json()
    record = json.loads(api_only.redis.get(f"nanochat:job:{job['id']}"))
    rq_key = f"rq:job:{record['rq_job_id']}"
    assert json.loads(zlib.decompress(api_only.redis.hget(rq_key, "data")))[2] == [job["id"]]  # JSON: args
    api_only.redis.hset(rq_key, "data", zlib.compress(pickle.dumps(Exploit())))

    with pytest.raises(DeserializationError):
        Job.fetch(record["rq_job_id"], connection=api_only.redis, serializer=SERIALIZER).get_call_string()
    assert not marker.exists()
    with api_only.client() as client:
        client.post(f"/jobs/{job['id']}/stop")


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


def test_public_read_lets_reads_through_without_the_token_but_not_changes(redis_url: str, tmp_path) -> None:
    port = free_port()
    env = service_env(
        API_TOKEN="a-token-for-public-read-tests", PUBLIC_READ="1", API_PORT=str(port), REDIS_URL=redis_url
    )
    api = Process("api", [PYTHON, "-m", "api"], env, tmp_path)
    try:
        api.wait_healthy(f"http://127.0.0.1:{port}/health")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/jobs").status_code == 200
            assert client.get("/jobs/schema").status_code == 200
            assert client.get("/models").status_code == 200
            assert client.post("/jobs", json=VALID).status_code == 401
            assert client.delete(f"/jobs/{UNKNOWN_ID}").status_code == 401
    finally:
        api.stop()


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
            assert client.post(f"/jobs/{job.json()['id']}/stop").json()["status"] == "canceled"
            assert client.get("/jobs").status_code == 200
    finally:
        api.stop()


def fake_checkpoint(base_dir: Path, run: str, stage: str, step: int, shapes: dict[str, list[int]]) -> None:
    """A checkpoint folder as the trainer writes it: safetensors weights (zeros) and meta.json last."""
    (base_dir / "runs" / run / "tokenizer").mkdir(parents=True, exist_ok=True)
    folder = base_dir / "runs" / run / stage / f"step_{step:06d}"
    folder.mkdir(parents=True)
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(encoded).to_bytes(8, "little") + encoded + bytes(offset))
    (folder / "meta.json").write_text(json.dumps({"step": step}))


def test_models_are_listed_with_their_numbers_and_deleted_only_when_no_job_uses_them(api_only: Stack) -> None:
    fake_checkpoint(api_only.base_dir, "m", "sft", 7, {"wte.weight": [64, 16], "lm_head.weight": [64, 16]})
    report = api_only.base_dir / "runs" / "m" / "report"
    report.mkdir()
    (report / "chat_sft.json").write_text(json.dumps({"val_bpb": 1.25, "steps": 7, "source": "m/mid"}))
    (report / "chat_eval_sft.json").write_text(json.dumps({"ARC-Easy": 0.31}))
    (report / "report.md").write_text("# Report card: m\n")
    (report / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with api_only.client() as client:
        listed = {m["id"]: m for m in client.get("/models").json()}
        model = listed["m-sft-000007"]
        assert (model["run"], model["stage"], model["step"], model["params"]) == ("m", "sft", 7, 2 * 64 * 16)
        assert model["metrics"] == {"val_bpb": 1.25, "steps": 7, "ARC-Easy": 0.31}
        assert client.get("/models/m-sft-000007/report").json() == {
            "markdown": "# Report card: m\n",
            "charts": ["loss.png"],
        }
        chart = client.get("/models/m-sft-000007/report/charts/loss.png")
        assert chart.headers["content-type"] == "image/png"
        assert client.get("/models/m-sft-000007/report/charts/..%2Freport.md").status_code in (404, 422)
        assert client.get("/models/m-sft-000008").status_code == 404
        job = client.post("/jobs", json={**VALID, "run": "m"}).json()
        refused = client.delete("/models/m-sft-000007")
        assert refused.status_code == 409 and job["id"] in refused.json()["detail"]
        client.post(f"/jobs/{job['id']}/stop")
        assert client.delete("/models/m-sft-000007").status_code == 204
        assert client.get("/models/m-sft-000007").status_code == 404
    assert not (api_only.base_dir / "runs" / "m" / "sft" / "step_000007").exists()


def test_open_streams_are_bounded_per_job(api_only: Stack) -> None:
    with api_only.client() as client, contextlib.ExitStack() as streams:
        job = client.post("/jobs", json={**VALID, "run": "watched"}).json()  # stays queued: no worker
        url = f"/jobs/{job['id']}/logs?follow=true"
        for _ in range(8):  # API_MAX_FOLLOWERS_PER_JOB's default
            assert streams.enter_context(client.stream("GET", url)).status_code == 200
        refused = client.get(url)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert client.get(f"/jobs/{job['id']}/metrics?follow=true").status_code == 429  # same job, same bound
        client.post(f"/jobs/{job['id']}/stop")
