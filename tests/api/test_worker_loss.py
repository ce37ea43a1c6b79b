"""A work horse killed mid-job (SIGKILL, out of memory) is reported as a failed job, and its program stops."""

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Stack, start_stack
from support import wait_until


@pytest.fixture(scope="module")
def own_stack(redis_url: str, data_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own: this module kills its worker's work horse."""
    yield from start_stack(redis_url, tmp_path_factory.mktemp("loss"), data_kit, with_worker=True)


def process_with(*words: str) -> list[int]:
    """Pids of processes whose command line contains every word."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(word.encode() in command for word in words):
                pids.append(int(entry.name))
    return pids


def parent_of(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def test_killed_work_horse_fails_the_job_and_stops_its_program(own_stack: Stack) -> None:
    with own_stack.client() as client:
        tokenizer_job = client.post(
            "/jobs", json={"kind": "tokenizer", "run": "lost", "config": {"vocab_size": 512}}
        )
        wait_until(
            lambda: client.get(f"/jobs/{tokenizer_job.json()['id']}").json()["status"] == "finished",
            60,
            "tokenizer",
        )
        config = {
            "depth": 2,
            "head_dim": 64,
            "max_seq_len": 64,
            "device_batch_size": 2,
            "total_batch_size": 128,
            "num_iterations": 100000,
            "eval_every": 0,
            "sample_every": 0,
            "save_every": 0,
        }
        job = client.post("/jobs", json={"kind": "base_train", "run": "lost", "config": config}).json()
        wait_until(
            lambda: "step 2/100000 | loss" in client.get(f"/jobs/{job['id']}/logs").text, 120, "training"
        )

        (trainer,) = process_with("trainer.base_train", "lost")
        os.kill(parent_of(trainer), signal.SIGKILL)  # the work horse, not the worker

        wait_until(
            lambda: client.get(f"/jobs/{job['id']}").json()["status"] == "failed", 60, "the job to fail"
        )
        record = client.get(f"/jobs/{job['id']}").json()
        assert record["error"].startswith("the worker lost this job") and record["ended_at"]
        # The program got SIGTERM when its parent died (it checkpoints, then exits).
        wait_until(lambda: not process_with("trainer.base_train", "lost"), 60, "the orphaned trainer to stop")
        events = client.get(f"/jobs/{job['id']}/logs?follow=true").text
        assert events.rstrip().endswith(f"data: {json.dumps({'status': 'failed'})}")
        # The worker itself survives and takes the next job.
        again = client.post(
            "/jobs", json={"kind": "tokenizer", "run": "lost", "config": {"vocab_size": 300}}
        ).json()
        wait_until(
            lambda: client.get(f"/jobs/{again['id']}").json()["status"] == "finished", 60, "the next job"
        )
