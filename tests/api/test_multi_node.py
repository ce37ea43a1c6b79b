"""A job with `nnodes: 2` runs on two workers that meet in torchrun's c10d rendezvous (here 2 workers ×
1 CPU process over gloo on one machine): it trains exactly the model one worker's 2 processes train,
both nodes' output reaches the job's log, a stop reaches the program on every node, and when the
second node's worker shuts down (or dies) every node checkpoints and the job is re-queued."""

import os
import shutil
import signal
from collections.abc import Iterator

import pytest
from safetensors.torch import load_file

from conftest import Stack
from support import Process, parent_of, process_with, wait_until

TRAINING = {
    "depth": 2,
    "head_dim": 64,
    "max_seq_len": 64,
    "device_batch_size": 2,
    "total_batch_size": 256,
    "num_iterations": 6,
    "eval_every": 3,
    "eval_tokens": 512,
    "sample_every": 0,
    "save_every": 3,
    "core_metric_every": -1,
    "dtype": "float32",
}


WORKERS: list[Process] = []  # the workers of this module's stack (more start as tests stop some)


@pytest.fixture(scope="module")
def two_workers(stack: Stack) -> Iterator[Stack]:
    """The stack's worker plus a second one, and one tokenizer copied into every run used here."""
    second = stack.start_worker("second")
    WORKERS.extend([*stack.processes, second])
    with stack.client() as client:
        job = client.post("/jobs", json={"kind": "tokenizer", "run": "one", "config": {"vocab_size": 512}})
        assert ended(stack, job.json()["id"])["status"] == "finished"
    runs = stack.base_dir / "runs"
    for run in ("two", "stopped", "requeued", "lost"):
        shutil.copytree(runs / "one" / "tokenizer", runs / run / "tokenizer")
    yield stack
    for worker in WORKERS:
        worker.stop()


def ended(stack: Stack, job_id: str, timeout: float = 240) -> dict:
    with stack.client() as client:
        is_over = lambda: client.get(f"/jobs/{job_id}").json()["status"] not in ("queued", "started")  # noqa: E731
        wait_until(is_over, timeout, f"job {job_id} to end")
        return client.get(f"/jobs/{job_id}").json()


def train(stack: Stack, run: str, **runner: int) -> dict:
    with stack.client() as client:
        job = client.post("/jobs", json={"kind": "base_train", "run": run, "config": TRAINING | runner})
        assert job.status_code == 201, job.text
    return job.json()


def test_two_nodes_train_the_model_two_processes_on_one_node_train(two_workers: Stack) -> None:
    one_node = ended(two_workers, train(two_workers, "one", nproc_per_node=2)["id"])
    two_nodes = ended(two_workers, train(two_workers, "two", nnodes=2)["id"])
    assert one_node["status"] == two_nodes["status"] == "finished", two_nodes
    with two_workers.client() as client:
        log = client.get(f"/jobs/{two_nodes['id']}/logs").text
    assert "--nnodes=2" in log and "--rdzv-backend=c10d" in log
    assert "[node 1] $ python -m torch.distributed.run" in log  # the second worker's own torchrun
    assert "cpu × 2 process(es)" in log
    runs = two_workers.base_dir / "runs"
    final = [runs / run / "base" / "step_000006" for run in ("one", "two")]
    assert sorted(p.name for p in final[1].iterdir()) == sorted(p.name for p in final[0].iterdir())
    weights = [load_file(folder / "model.safetensors") for folder in final]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        assert tensor.equal(weights[1][name]), name
    assert two_nodes["progress"]["loss"] == one_node["progress"]["loss"]
    assert two_nodes["result"]["val_bpb"] == one_node["result"]["val_bpb"]


def test_a_stop_reaches_the_program_on_every_node(two_workers: Stack) -> None:
    job = train(two_workers, "stopped", nnodes=2, num_iterations=100_000, eval_every=0, save_every=0)
    with two_workers.client() as client:
        progress = lambda: client.get(f"/jobs/{job['id']}").json()["progress"].get("step", 0)  # noqa: E731
        wait_until(lambda: progress() >= 2, 120, "two steps")
        assert client.post(f"/jobs/{job['id']}/stop").status_code == 200
    record = ended(two_workers, job["id"])
    assert record["status"] == "stopped", record
    assert not process_with("trainer.base_train", "stopped")  # neither node's program is left
    saved = list((two_workers.base_dir / "runs" / "stopped" / "base").glob("step_*/rank01.pt"))
    assert saved, "the stop's checkpoint lacks the second node's rank"


def second_node_worker(stack: Stack, run: str, save_every: int, steps: int) -> tuple[Process, str]:
    """Once a 2-node job of `run` has made `steps` steps: the worker running its second node, and the
    job's id."""
    job = train(stack, run, nnodes=2, num_iterations=30, eval_every=0, save_every=save_every)
    with stack.client() as client:
        progress = lambda: client.get(f"/jobs/{job['id']}").json()["progress"].get("step", 0)  # noqa: E731
        wait_until(lambda: progress() >= steps, 120, f"{steps} steps")
    (agent,) = process_with("torch.distributed.run", "--rdzv-conf=is_host=false")  # node 1's torchrun
    (worker,) = [w for w in WORKERS if w.popen.pid == parent_of(parent_of(agent))]
    return worker, job["id"]


def resumed_and_finished(stack: Stack, job_id: str, first_end: str, from_step: int) -> None:
    WORKERS.append(stack.start_worker(f"replacement-{len(WORKERS)}"))  # two workers again
    record = ended(stack, job_id)
    assert record["status"] == "finished", record
    first, second = record["attempts"]
    assert first["end_reason"].startswith(first_end)  # re-queued, not failed
    assert second["resumed_from_step"] >= from_step
    assert record["result"]["steps"] == 30


def test_a_further_node_whose_worker_shuts_down_requeues_the_job(two_workers: Stack) -> None:
    worker, job_id = second_node_worker(two_workers, "requeued", save_every=0, steps=2)
    os.kill(worker.popen.pid, signal.SIGTERM)
    worker.popen.wait(timeout=60)
    # Not counted as a lost worker, and resumed from the checkpoint every node saved on the way out.
    resumed_and_finished(two_workers, job_id, "worker shut down", from_step=2)


def test_a_further_node_whose_worker_dies_requeues_the_job_as_a_lost_worker(two_workers: Stack) -> None:
    worker, job_id = second_node_worker(two_workers, "lost", save_every=5, steps=7)
    (agent,) = process_with("torch.distributed.run", "--rdzv-conf=is_host=false")
    for pid in (worker.popen.pid, parent_of(agent)):  # the worker and its work horse
        os.kill(pid, signal.SIGKILL)
    worker.popen.wait(timeout=10)
    # At least from the latest periodic checkpoint (none was saved on the way out when this was written).
    resumed_and_finished(two_workers, job_id, "worker lost: no heartbeat from node 1", from_step=5)
