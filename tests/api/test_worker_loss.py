"""A worker that dies mid-job (SIGKILL of its work horse, or of the whole worker) costs the job one
attempt, not its progress: the reaper re-queues it and the next attempt resumes from its checkpoint.
A worker told to shut down (SIGTERM) has the program checkpoint at once and re-queues the job itself."""

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import LEASE_SECONDS, Stack, start_stack
from support import Process, parent_of, process_with, wait_until

TRAINING = {
    "depth": 2,
    "head_dim": 64,
    "max_seq_len": 256,
    "device_batch_size": 8,
    "total_batch_size": 2048,
    "num_iterations": 60,
    "eval_every": 0,
    "sample_every": 0,
    "save_every": 10,
    "core_metric_every": -1,
    "eval_tokens": 4096,
    "dtype": "float32",
}


@pytest.fixture(scope="module")
def own_stack(redis_url: str, data_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own (this module kills workers), with a trained tokenizer in runs a and b."""
    stack_iter = start_stack(redis_url, tmp_path_factory.mktemp("loss"), data_kit, with_worker=True)
    stack = next(stack_iter)
    with stack.client() as client:
        tokenizers = [
            client.post("/jobs", json={"kind": "tokenizer", "run": run, "config": {"vocab_size": 512}}).json()
            for run in ("a", "b", "c", "reference")
        ]
    for job in tokenizers:
        assert finished(stack, job["id"], timeout=60)["status"] == "finished"
    yield stack
    next(stack_iter, None)
    for run in ("a", "b", "c", "reference"):  # a trainer a failed test left behind
        for pid in process_with("trainer.base_train", "--run", run):
            os.kill(pid, signal.SIGKILL)


def train_until_step(stack: Stack, run: str, step: int, **config: int) -> dict:
    with stack.client() as client:
        job = client.post(
            "/jobs", json={"kind": "base_train", "run": run, "config": TRAINING | config}
        ).json()
        wait_until(
            lambda: client.get(f"/jobs/{job['id']}").json()["progress"].get("step", 0) >= step, 120, "steps"
        )
    return job


def finished(stack: Stack, job_id: str, timeout: float = 180) -> dict:
    with stack.client() as client:
        wait_until(
            lambda: client.get(f"/jobs/{job_id}").json()["status"] in ("finished", "failed"), timeout, "end"
        )
        return client.get(f"/jobs/{job_id}").json()


@pytest.fixture(scope="module")
def reference(own_stack: Stack) -> dict:
    """The same training, never interrupted."""
    with own_stack.client() as client:
        job = client.post("/jobs", json={"kind": "base_train", "run": "reference", "config": TRAINING}).json()
    return finished(own_stack, job["id"])


def test_killed_work_horse_requeues_the_job_which_resumes(own_stack: Stack, reference: dict) -> None:
    job = train_until_step(own_stack, "a", 25)
    (trainer,) = process_with("trainer.base_train", "a")
    os.kill(parent_of(trainer), signal.SIGKILL)  # the work horse, not the worker
    # The program got SIGTERM when its parent died: it checkpoints, then exits.
    wait_until(
        lambda: not process_with("trainer.base_train", "--run", "a", "--depth"), 60, "the orphan to stop"
    )
    record = finished(own_stack, job["id"])
    assert record["status"] == "finished", record
    first, second = record["attempts"]
    assert first["end_reason"].startswith("worker lost: no heartbeat")
    assert second["resumed_from_step"] >= 20 and second["end_reason"] == "finished"
    assert record["progress"]["loss"] == reference["progress"]["loss"]  # as if nothing happened
    assert record["result"]["steps"] == 60


def test_killed_worker_is_replaced_and_the_job_resumes_from_its_checkpoint(
    own_stack: Stack, reference: dict
) -> None:
    job = train_until_step(own_stack, "b", 25)
    (worker,) = [p for p in own_stack.processes if p.name == "worker"]
    (trainer,) = process_with("trainer.base_train", "b")
    # The whole worker: its main process and its work horse (RQ puts the horse in a group of its own).
    for pid in (worker.popen.pid, parent_of(trainer)):
        os.kill(pid, signal.SIGKILL)
    wait_until(
        lambda: not process_with("trainer.base_train", "--run", "b", "--depth"), 60, "the orphan to stop"
    )
    checkpoints = sorted(p.name for p in (own_stack.base_dir / "runs" / "b" / "base").glob("step_*"))
    replacement: Process = own_stack.start_worker("replacement")
    try:
        record = finished(own_stack, job["id"], timeout=LEASE_SECONDS * 10 + 180)
    finally:
        replacement.stop()
    assert record["status"] == "finished", record
    first, second = record["attempts"]
    assert first["end_reason"].startswith("worker lost") and first["worker"] != second["worker"]
    assert f"step_{second['resumed_from_step']:06d}" == checkpoints[-1]  # no completed checkpoint redone
    assert record["progress"]["loss"] == reference["progress"]["loss"]


def test_worker_told_to_stop_checkpoints_at_once_and_requeues_the_job(
    own_stack: Stack, reference: dict
) -> None:
    extra = own_stack.start_worker("to-shut-down")  # the module's first worker may be gone by now
    workers = [*own_stack.processes, extra]
    job = train_until_step(own_stack, "c", 25, save_every=1000)  # no periodic checkpoint to fall back on
    (trainer,) = process_with("trainer.base_train", "c")
    (worker,) = [w for w in workers if w.popen.pid == parent_of(parent_of(trainer))]
    os.kill(worker.popen.pid, signal.SIGTERM)  # what `docker compose stop` sends
    worker.popen.wait(timeout=40)  # as soon as the program has saved, not after the whole job
    (saved,) = [p.name for p in (own_stack.base_dir / "runs" / "c" / "base").glob("step_*")]
    with own_stack.client() as client:
        first = client.get(f"/jobs/{job['id']}").json()["attempts"][0]
    assert first["end_reason"] == "worker shut down"  # back on the queue, not failed or stopped
    replacement = own_stack.start_worker("after-shutdown")
    try:
        record = finished(own_stack, job["id"])
    finally:
        replacement.stop()
        extra.stop()  # whichever of the two was not told to stop
    assert record["status"] == "finished", record
    assert len(record["attempts"]) == 2
    resumed = record["attempts"][1]["resumed_from_step"]
    assert f"step_{resumed:06d}" == saved and resumed >= 25
    assert record["progress"]["loss"] == reference["progress"]["loss"]
