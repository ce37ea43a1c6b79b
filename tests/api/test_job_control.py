"""Job control through the API (no worker: jobs stay queued): a full Redis, a model another run's job
starts from, a body that is not UTF-8 JSON, a crowd of log followers."""

import asyncio
import threading
from collections.abc import Iterator

import httpx
import pytest
from jobs import queue, records

from tests.inference.conftest import write_checkpoint

from conftest import Stack, start_stack

TOKENIZER = {"kind": "tokenizer", "run": "full", "config": {"vocab_size": 1024}}


@pytest.fixture
def full_redis(api_only: Stack) -> Stack:
    """The API's Redis at its maxmemory (noeviction): it refuses every write until room is made."""
    api_only.redis.config_set("maxmemory", 1)
    yield api_only
    api_only.redis.config_set("maxmemory", 0)


def test_a_submit_refused_for_want_of_memory_is_retried_until_redis_has_room(full_redis: Stack) -> None:
    room = threading.Timer(0.5, full_redis.redis.config_set, ("maxmemory", 0))
    room.start()
    with full_redis.client() as client:
        response = client.post("/jobs", json=TOKENIZER)
    room.join()
    assert response.status_code == 201, response.text
    assert full_redis.queue_length() == 1
    with full_redis.client() as client:
        assert client.post(f"/jobs/{response.json()['id']}/stop").json()["status"] == "canceled"


def test_a_redis_that_stays_full_is_a_503_that_says_so_and_nothing_is_half_written(full_redis: Stack) -> None:
    with full_redis.client() as client:
        listing = client.get("/jobs")
        assert listing.status_code == 200, listing.text
        jobs_before = listing.json()["total"]
        response = client.post("/jobs", json={**TOKENIZER, "run": "never"})
        assert response.status_code == 503
        assert "Redis is out of memory" in response.json()["detail"]
        assert client.get("/jobs").json()["total"] == jobs_before
        paths = client.get("/openapi.json").json()["paths"]
    assert "503" in paths["/jobs"]["post"]["responses"]


def test_a_model_that_another_runs_active_job_starts_from_is_not_deleted(api_only: Stack) -> None:
    write_checkpoint(api_only.base_dir / "runs", "src", "sft", 7, seed=7)
    (api_only.base_dir / "runs" / "src" / "tokenizer").mkdir()
    spec = {"kind": "chat_sft", "run": "derived", "config": {"source_run": "src", "num_iterations": 5}}
    with api_only.client() as client:
        job = client.post("/jobs", json=spec).json()
        refused = client.delete("/models/src-sft-000007")
        assert refused.status_code == 409 and job["id"] in refused.json()["detail"]
        assert client.get("/models/src-sft-000007").status_code == 200
        client.post(f"/jobs/{job['id']}/stop")
        assert client.delete("/models/src-sft-000007").status_code == 204


@pytest.mark.parametrize("path", ["/jobs", "/models/import"])
def test_a_body_that_is_not_utf8_json_gets_a_status_the_schema_documents(api_only: Stack, path: str) -> None:
    with api_only.client() as client:
        jobs_before = client.get("/jobs").json()["total"]
        latin1 = b'{"kind": "tokenizer", "run": "\xff\xfe"}'
        response = client.post(path, content=latin1, headers={"Content-Type": "application/json"})
        documented = client.get("/openapi.json").json()["paths"][path]["post"]["responses"]
        assert 400 <= response.status_code < 500 and str(response.status_code) in documented
        assert client.get("/jobs").json()["total"] == jobs_before


@pytest.fixture(scope="module")
def crowd_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """No worker, and room for 150 followers of one job."""
    workdir = tmp_path_factory.mktemp("crowd")
    yield from start_stack(redis_url, workdir, None, with_worker=False, API_MAX_FOLLOWERS_PER_JOB="150")


def test_as_many_followers_as_the_api_admits_all_get_every_line(crowd_stack: Stack) -> None:
    """Each open stream waits in its own blocking read on Redis: 150 at once (the API admits up to
    API_MAX_FOLLOWERS, 256 by default), then a line, then the job ends."""
    with crowd_stack.client() as client:
        job = client.post("/jobs", json={**TOKENIZER, "run": "crowd"}).json()

    async def follow(client: httpx.AsyncClient) -> list[str]:
        lines = []
        async with client.stream("GET", f"/jobs/{job['id']}/logs", params={"follow": "true"}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(line)
        return lines

    async def crowd() -> list[list[str]]:
        headers = {"Authorization": f"Bearer {crowd_stack.token}"}
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(
            base_url=crowd_stack.api_url, headers=headers, limits=limits, timeout=60
        ) as client:
            streams = [asyncio.create_task(follow(client)) for _ in range(150)]
            await asyncio.sleep(5)  # every stream is in its blocking read
            records.append_log(crowd_stack.redis, job["id"], "the one line")
            await asyncio.sleep(1)
            queue.stop(crowd_stack.redis, job["id"])
            return await asyncio.gather(*streams, return_exceptions=True)

    received = asyncio.run(crowd())
    complete = [
        r for r in received if isinstance(r, list) and "data: the one line" in r and "event: end" in r
    ]
    assert len(complete) == 150, [r for r in received if r not in complete][:3]
