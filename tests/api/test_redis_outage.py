"""Redis goes away for 10 s while a job trains and another waits, then comes back from its append-only
file: nothing is lost, the running job finishes, the waiting one runs, and the worker and API live on."""

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis
from test_worker_loss import TRAINING, finished

from conftest import Stack, start_stack
from support import free_port, wait_until

PASSWORD = "a-password-for-this-redis"


class RedisServer:
    """A password-protected redis-server with append-only persistence, stopped and started at will."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.folder), "--appendonly", "yes", "--save", "", "--requirepass", PASSWORD],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = Redis.from_url(self.url)
        wait_until(lambda: self.answers(client), 10, "redis")

    @staticmethod
    def answers(client: Redis) -> bool:
        try:
            return client.ping()
        except Exception:
            return False

    def stop(self) -> None:
        self.process.terminate()  # a clean shutdown: the append-only file is synced
        self.process.wait(10)


@pytest.fixture(scope="module")
def outage_stack(
    data_kit: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, RedisServer]]:
    server = RedisServer(tmp_path_factory.mktemp("aof"))
    server.start()
    stack_iter = start_stack(server.url, tmp_path_factory.mktemp("outage"), data_kit, with_worker=True)
    try:
        yield next(stack_iter), server
    finally:
        next(stack_iter, None)
        if server.process.poll() is None:
            server.stop()


def test_a_redis_restart_loses_nothing_and_the_jobs_go_on(outage_stack: tuple[Stack, RedisServer]) -> None:
    stack, server = outage_stack
    with stack.client() as client:
        tokenizer = client.post(
            "/jobs", json={"kind": "tokenizer", "run": "r", "config": {"vocab_size": 512}}
        )
        assert finished(stack, tokenizer.json()["id"], timeout=60)["status"] == "finished"
        training = client.post("/jobs", json={"kind": "base_train", "run": "r", "config": TRAINING}).json()
        wait_until(
            lambda: client.get(f"/jobs/{training['id']}").json()["progress"].get("step", 0) >= 5, 120, "steps"
        )
        waiting = client.post(
            "/jobs", json={"kind": "tokenizer", "run": "other", "config": {"vocab_size": 300}}
        ).json()
        assert client.get(f"/jobs/{waiting['id']}").json()["status"] == "queued"  # the one worker is busy
        before = client.get(f"/jobs/{training['id']}/logs").text.splitlines()

        server.stop()
        assert client.get("/health").status_code == 503  # the API says so, and does not hang
        time.sleep(10)
        server.start()

        record = finished(stack, training["id"], timeout=180)
        assert record["status"] == "finished", record
        assert record["result"]["steps"] == TRAINING["num_iterations"] and len(record["attempts"]) == 1
        log = client.get(f"/jobs/{training['id']}/logs").text.splitlines()
        assert log[: len(before)] == before  # kept through the restart ...
        steps = [line.split()[1] for line in log if line.startswith("step ") and "| loss" in line]
        assert steps == [f"{i}/60" for i in range(1, 61)]  # ... and nothing missing from the outage
        assert finished(stack, waiting["id"], timeout=120)["status"] == "finished"
        assert client.get("/health").status_code == 200
    assert all(p.popen.poll() is None for p in stack.processes)  # the API and the worker lived


def test_a_follow_cut_by_a_redis_restart_gives_its_slot_back_at_once(tmp_path: Path) -> None:
    """A follower whose stream a Redis restart cut reconnects at once: its slot is free again (one a job
    here), not held until the server collects the dead stream."""
    server = RedisServer(tmp_path / "aof")
    (tmp_path / "aof").mkdir()
    server.start()
    stacks = start_stack(server.url, tmp_path, None, with_worker=False, API_MAX_FOLLOWERS_PER_JOB="1")
    try:
        stack = next(stacks)
        with stack.client() as client:
            job = client.post("/jobs", json={"kind": "tokenizer", "run": "r", "config": {}}).json()  # queued
            follow = f"/jobs/{job['id']}/logs?follow=true"
            with client.stream("GET", follow) as first:
                assert first.status_code == 200
                server.stop()
                with pytest.raises(httpx.HTTPError):  # the stream is cut
                    for _ in first.iter_bytes():
                        pass
            server.start()
            with client.stream("GET", follow) as again:
                assert again.status_code == 200, again.read()
    finally:
        next(stacks, None)
        if server.process.poll() is None:
            server.stop()
