"""Workers started alike (`--scale worker=N`) with WORKER_GPUS=`0,1;2,3` take one GPU set each: never
the same set twice on one machine, a dead worker's set frees itself, and one worker too many says why;
a worker of CPU jobs alone takes none."""

import subprocess
import time
from pathlib import Path

import pytest
from redis import Redis

from worker import gpus

from support import PYTHON, Process, service_env, wait_until


def test_workers_of_one_machine_take_different_sets_and_the_last_one_none(redis: Redis) -> None:
    assert gpus.claim(redis, "box", "0,1;2,3", "w1", 30) == "0,1"
    assert gpus.claim(redis, "box", "0,1;2,3", "w2", 30) == "2,3"
    with pytest.raises(SystemExit, match=r"held on machine 'box' \(0,1 by w1, 2,3 by w2\)"):
        gpus.claim(redis, "box", "0,1;2,3", "w3", 30)
    assert gpus.claim(redis, "other-box", "0,1;2,3", "w4", 30) == "0,1"  # another machine's GPUs
    gpus.release(redis, "box", "0,1", "w2")  # not its set: nothing happens
    gpus.release(redis, "box", "0,1", "w1")
    assert gpus.claim(redis, "box", "0,1;2,3", "w3", 30) == "0,1"


def test_a_set_frees_itself_unless_its_worker_renews_it(redis: Redis) -> None:
    gpus.claim(redis, "box", "0;1", "alive", 0.6)
    stop_renewing = gpus.keep(redis, "box", "0", "alive", 0.6)
    gpus.claim(redis, "box", "0;1", "dies", 0.6)  # claimed, never renewed
    time.sleep(1.5)
    try:
        assert gpus.claim(redis, "box", "0;1", "next", 0.6) == "1"
    finally:
        stop_renewing()


def test_worker_processes_each_take_a_set(redis_url: str, tmp_path: Path) -> None:
    Redis.from_url(redis_url).flushall()
    env = service_env(REDIS_URL=redis_url, WORKER_GPUS="0;1", JOB_LEASE_SECONDS="3")
    workers = [Process(f"worker{i}", [PYTHON, "-m", "worker"], env, tmp_path) for i in range(2)]
    try:
        for worker in workers:
            wait_until(lambda w=worker: "listening on nanochat-" in w.output(), 30, f"{worker.name} to start")
        taken = sorted(worker.output().split("GPUs ")[1].split(")")[0] for worker in workers)
        assert taken == ["0", "1"]
        third = subprocess.run(
            [PYTHON, "-m", "worker"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert third.returncode != 0 and "every GPU set in WORKER_GPUS is held" in third.stderr
        # A worker of CPU jobs alone (compose's cpu-worker, given the same .env) needs no set: it starts.
        cpu_only = Process("cpu-worker", [PYTHON, "-m", "worker"], env | {"WORKER_QUEUES": "cpu"}, tmp_path)
        workers.append(cpu_only)
        wait_until(
            lambda: "listening on nanochat-cpu-jobs (" in cpu_only.output(), 30, "the CPU worker to start"
        )
    finally:
        for worker in workers:
            worker.stop()
    assert not Redis.from_url(redis_url).keys("nanochat:gpus:*")  # given back on the way out
