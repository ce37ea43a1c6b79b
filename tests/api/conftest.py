"""The API and a worker as real processes over a private Redis, with the offline data kit."""

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from jobs.queue import QUEUE_NAMES, rq_queue
from redis import Redis

from support import PYTHON, Process, free_port, service_env

LEASE_SECONDS = 3  # a dead worker's job is re-queued about this long after its death


@dataclass
class Stack:
    api_url: str
    token: str
    base_dir: Path
    redis: Redis
    env: dict[str, str]
    workdir: Path
    processes: list[Process]

    def start_worker(self, name: str = "worker") -> Process:
        return Process(name, [PYTHON, "-m", "worker"], self.env, self.workdir)

    def queue_length(self) -> int:
        """RQ jobs waiting on both queues (the GPU jobs' and the CPU jobs')."""
        return sum(len(rq_queue(self.redis, kind)) for kind in QUEUE_NAMES)

    def client(self, token: str | None = "valid") -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token if token == 'valid' else token}"} if token else {}
        return httpx.Client(base_url=self.api_url, headers=headers, timeout=30)


def start_stack(
    redis_url: str, workdir: Path, data_kit: Path | None, with_worker: bool, **settings: str
) -> Iterator[Stack]:
    redis = Redis.from_url(redis_url)
    redis.flushall()
    port, token = free_port(), secrets.token_urlsafe(24)
    env = service_env(
        REDIS_URL=redis_url,
        API_TOKEN=token,
        API_PORT=str(port),
        JOB_LEASE_SECONDS=str(LEASE_SECONDS),
        NANOCHAT_BASE_DIR=str(workdir / "base"),
        JOB_CANCEL_GRACE_SECONDS="20",
        **settings,
    )
    if data_kit is not None:
        env["NANOCHAT_DATA_DIR"] = str(data_kit)
    processes = [Process("api", [PYTHON, "-m", "api"], env, workdir)]
    if with_worker:
        processes.append(Process("worker", [PYTHON, "-m", "worker"], env, workdir))
    try:
        processes[0].wait_healthy(f"http://127.0.0.1:{port}/health")
        yield Stack(f"http://127.0.0.1:{port}", token, workdir / "base", redis, env, workdir, processes)
    finally:
        for process in processes:
            process.stop()
        redis.close()


@pytest.fixture(scope="module")
def stack(redis_url: str, data_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from start_stack(redis_url, tmp_path_factory.mktemp("stack"), data_kit, with_worker=True)


@pytest.fixture(scope="module")
def api_only(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """No worker: submitted jobs stay queued."""
    yield from start_stack(redis_url, tmp_path_factory.mktemp("api"), None, with_worker=False)
