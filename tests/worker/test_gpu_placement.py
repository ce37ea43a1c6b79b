"""A job's GPUs: the first nproc_per_node of its worker's, marked as the job's in Redis while its program
runs; the program starts once the model server has let go of them, or after a bounded wait. The
machine's GPUs come from a fake nvidia-smi on PATH (these tests run without a GPU)."""

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobs import gpu_claims, queue, records
from jobs.records import JobRecord, JobStatus
from jobs.specs import JOB_SPEC
from pydantic import ValidationError
from redis import Redis

from tests.inference.conftest import tiny_tokenizer
from worker import gpus
from worker.settings import WorkerSettings
from worker.tasks import child_environment

from support import PYTHON, Process, fake_nvidia_smi, process_with, service_env, wait_until

# A base_train of run gpus that ends in seconds on a CPU (its tokenizer is put in place by the fixture).
TINY_TRAINING = {"depth": 2, "max_seq_len": 64, "device_batch_size": 2, "total_batch_size": 128,
                 "num_iterations": 2, "eval_every": -1, "core_metric_every": -1,
                 "sample_every": -1}  # fmt: skip


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path / "bin", "GPU-a", "GPU-b", "GPU-c", "GPU-d"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_a_job_takes_the_first_gpus_of_its_worker(four_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert gpus.for_job(WorkerSettings(), 2) == gpus.JobGpus("0,1", ["GPU-a", "GPU-b"])
    monkeypatch.setenv("WORKER_GPUS", "1,2")  # this worker's share of the machine
    assert gpus.for_job(WorkerSettings(), 1) == gpus.JobGpus("1", ["GPU-b"])
    assert gpus.for_job(WorkerSettings(), 2) == gpus.JobGpus("1,2", ["GPU-b", "GPU-c"])
    monkeypatch.delenv("WORKER_GPUS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,2")  # the worker's own view, without WORKER_GPUS
    assert gpus.for_job(WorkerSettings(), 1) == gpus.JobGpus("3", ["GPU-d"])


def test_the_jobs_that_use_no_gpu_take_none_and_wait_for_no_model_server(
    four_gpus: None, redis: Redis
) -> None:
    """They train a tokenizer or convert or read files: on the CPU, while the model server keeps serving
    from the GPUs."""
    redis.set(gpu_claims.server_key("GPU-a"), "the model server", ex=60)
    for kind, config in [
        ("export", {}),
        ("import", {"source": "owner/name"}),
        ("tokenizer", {}),
        ("validate_file", {"file": "file-" + "0" * 24}),
    ]:
        spec = JOB_SPEC.validate_python({"kind": kind, "run": "r", "config": config})
        placed = gpus.for_job(WorkerSettings(), spec.nproc_per_node)
        assert placed == gpus.JobGpus("", [])
        assert child_environment(WorkerSettings(), placed.devices)["CUDA_VISIBLE_DEVICES"] == ""
        assert gpus.wait_for_model_server(redis, placed, pytest.fail, lambda: None) is None


def test_a_job_asking_for_more_gpus_than_its_worker_has_is_refused(
    four_gpus: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_GPUS", "1,2")
    with pytest.raises(gpus.NotEnoughGpus, match=r"nproc_per_node is 3 but this worker has 2 GPU\(s\)"):
        gpus.for_job(WorkerSettings(), 3)
    monkeypatch.setenv("WORKER_GPUS", "all of them")
    with pytest.raises(ValidationError, match="WORKER_GPUS"):
        WorkerSettings()


def test_without_gpus_the_processes_share_the_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: a machine without GPUs
    monkeypatch.setenv("WORKER_GPUS", "1,2")
    assert gpus.for_job(WorkerSettings(), 8) == gpus.JobGpus("1,2", [])  # handed on as it is; no refusal
    monkeypatch.delenv("WORKER_GPUS")
    assert gpus.for_job(WorkerSettings(), 2) == gpus.JobGpus(None, [])


def test_the_program_numbers_its_gpus_as_nvidia_smi_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # the worker's view: every GPU
    env = child_environment(WorkerSettings(), "2,3")
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


@pytest.fixture
def held_by_server(redis: Redis) -> gpus.JobGpus:
    """A job's GPU on which the model server holds memory and never lets go."""
    redis.set(gpu_claims.server_key("GPU-a"), "a server that never answers", ex=60)
    return gpus.JobGpus("0", ["GPU-a"])


def test_a_model_server_that_never_lets_go_holds_the_job_back_for_a_bounded_time(
    redis: Redis, held_by_server: gpus.JobGpus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpus, "SERVER_WAIT_SECONDS", 1.0)
    said: list[str] = []
    started = time.monotonic()
    assert gpus.wait_for_model_server(redis, held_by_server, said.append, lambda: None) is None
    assert 1.0 <= time.monotonic() - started < 5
    assert said[0].startswith("waiting for the model server to unload its models from the job's GPUs (0)")
    assert "WORKER_GPUS / INFERENCE_GPUS" in said[0]  # how to avoid the wait
    assert said[-1] == "the model server still holds the GPU after 1 s: starting"


def test_a_stop_during_the_wait_ends_it_without_starting_the_program(
    redis: Redis, held_by_server: gpus.JobGpus
) -> None:
    started = time.monotonic()
    stop = lambda: "stopped on request"  # noqa: E731
    assert gpus.wait_for_model_server(redis, held_by_server, [].append, stop) == "stopped on request"
    assert time.monotonic() - started < 5  # far less than SERVER_WAIT_SECONDS


@pytest.fixture(scope="module")
def worker_with_two_gpus(
    redis_url: str, data_kit: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Redis]:
    """A real worker on a machine whose nvidia-smi lists GPU-a and GPU-b; a Redis client on its database."""
    workdir = tmp_path_factory.mktemp("gpu-worker")
    tiny_tokenizer().save(workdir / "base" / "runs" / "gpus" / "tokenizer")
    redis = Redis.from_url(redis_url)
    redis.flushall()
    env = service_env(
        REDIS_URL=redis_url,
        NANOCHAT_BASE_DIR=str(workdir / "base"),
        NANOCHAT_DATA_DIR=str(data_kit),
        JOB_LEASE_SECONDS="3",
        PATH=fake_nvidia_smi(workdir / "bin", "GPU-a", "GPU-b"),
    )
    worker = Process("worker", [PYTHON, "-m", "worker"], env, workdir)
    try:
        wait_until(lambda: "listening on nanochat-" in worker.output(), 30, "the worker to start")
        yield redis
    finally:
        worker.stop()
        redis.close()


def submit(redis: Redis, spec: dict) -> JobRecord:
    return queue.submit(redis, JOB_SPEC.validate_python(spec))


def status(redis: Redis, job_id: str) -> JobStatus:
    return records.load(redis, job_id).status


def logged(redis: Redis, job_id: str, start: str) -> bool:
    """Whether a line of the job's log starts so."""
    return any(line.startswith(start) for _, line in records.read_log_page(redis, job_id, 0, 1000))


def environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_text().split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def test_the_program_starts_on_its_gpu_once_the_model_server_has_let_go(worker_with_two_gpus: Redis) -> None:
    redis = worker_with_two_gpus
    redis.set(gpu_claims.server_key("GPU-a"), "model server", ex=60)  # it serves on GPU 0 (INFERENCE_GPUS=0)
    job = submit(redis, {"kind": "base_train", "run": "gpus", "config": TINY_TRAINING})
    wait_until(lambda: gpu_claims.job_on(redis, "GPU-a") == job.id, 30, "the job to mark its GPU")
    wait_until(lambda: logged(redis, job.id, "waiting for the model server"), 10, "the job to say it waits")
    time.sleep(2)  # time enough for the program to start, were the GPU free
    assert not logged(redis, job.id, "$ python") and status(redis, job.id) == JobStatus.STARTED
    assert gpu_claims.job_on(redis, "GPU-b") is None  # one process: one GPU, the first

    redis.delete(gpu_claims.server_key("GPU-a"))  # the model server has unloaded its models
    wait_until(lambda: process_with("trainer.base_train", "--run", "gpus"), 10, "the program to start")
    program = environment(process_with("trainer.base_train", "--run", "gpus")[0])
    assert program["CUDA_VISIBLE_DEVICES"] == "0" and program["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert gpu_claims.job_on(redis, "GPU-a") == job.id  # marked for as long as the program runs

    wait_until(lambda: not records.load(redis, job.id).is_active, 60, "the job to end")
    assert status(redis, job.id) == JobStatus.FINISHED, records.load(redis, job.id).error
    assert gpu_claims.job_on(redis, "GPU-a") is None  # the model server may have it back
    assert logged(redis, job.id, "the model server let go of the GPU after")


def test_a_job_asking_for_more_gpus_than_its_worker_has_fails_at_once(worker_with_two_gpus: Redis) -> None:
    redis = worker_with_two_gpus
    job = submit(redis, {"kind": "base_train", "run": "big", "config": {"nproc_per_node": 4}})
    wait_until(lambda: not records.load(redis, job.id).is_active, 30, "the job to end")
    failed = records.load(redis, job.id)
    assert failed.status == JobStatus.FAILED
    assert failed.error.startswith("nproc_per_node is 4 but this worker has 2 GPU(s) (0,1)")
    assert not redis.keys(gpu_claims.job_key("*"))
