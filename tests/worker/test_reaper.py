"""The reaper, the retention clean-up and the log pump, on a real Redis; and what a job's program may see."""

import io
import time
from datetime import timedelta

import pytest
from jobs import queue, records
from jobs.records import Attempt, JobRecord, JobStatus
from jobs.specs import JOB_SPEC
from redis import Redis
from rq.job import Job
from rq.job import JobStatus as RQStatus

from worker.reaper import forget_old, reap, requeue_dropped
from worker.settings import WorkerSettings
from worker.tasks import SHUTDOWN, JobLog, Lease, Outcome, child_environment, finish


@pytest.fixture
def redis(redis_url: str) -> Redis:
    client = Redis.from_url(redis_url)
    client.flushall()
    return client


def started_job(redis: Redis, max_retries: int, lost_before: int = 0) -> JobRecord:
    """A started job whose worker is gone (no lease), after `lost_before` earlier lost workers."""
    lost = [
        Attempt(worker=f"w{i}", started_at=records.now(), ended_at=records.now(), end_reason="worker lost: …")
        for i in range(lost_before)
    ]
    record = JobRecord.new("tokenizer", "r", {"max_retries": max_retries})
    with redis.pipeline() as pipe:
        records.add(pipe, record)
        pipe.execute()
    return records.transition(
        redis, record.id, {JobStatus.QUEUED}, status=JobStatus.STARTED, started_at=records.now(),
        attempts=[*lost, Attempt(worker="gone", started_at=records.now())],
    )  # fmt: skip


def test_a_job_whose_lease_stays_missing_for_a_lease_is_requeued_then_failed_past_max_retries(
    redis: Redis,
) -> None:
    requeued, exhausted = started_job(redis, max_retries=1), started_job(redis, max_retries=1, lost_before=1)
    alive, stopping = started_job(redis, max_retries=1), started_job(redis, max_retries=1)
    records.transition(redis, stopping.id, {JobStatus.STARTED}, stop_requested=True)
    redis.set(records.lease_key(alive.id), 1, px=60_000)
    missing_since: dict[str, float] = {}
    assert reap(redis, 0.3, missing_since) == []  # seen missing once: maybe Redis was just down
    time.sleep(0.4)
    assert sorted(reap(redis, 0.3, missing_since)) == sorted([requeued.id, exhausted.id, stopping.id])

    again = records.load(redis, requeued.id)
    assert again.status == JobStatus.QUEUED and again.attempts[-1].end_reason.startswith(
        "worker lost: no heartbeat"
    )
    assert again.rq_job_id.startswith(f"{again.id}-2-")
    assert again.rq_job_id in queue.rq_queue(redis, "cpu").job_ids  # a tokenizer job: on the CPU jobs' queue
    failed = records.load(redis, exhausted.id)
    assert failed.status == JobStatus.FAILED and "2 workers lost; max_retries is 1" in failed.error
    assert records.load(redis, alive.id).status == JobStatus.STARTED
    assert records.load(redis, stopping.id).status == JobStatus.STOPPED  # a stop is never lost to a re-queue
    assert redis.smembers(records.STARTED_SET) == {alive.id.encode()}


def test_a_worker_shutting_down_requeues_its_job_unless_a_stop_was_asked_for_meanwhile(redis: Redis) -> None:
    running, stopping = started_job(redis, max_retries=0), started_job(redis, max_retries=0)
    records.transition(redis, stopping.id, {JobStatus.STARTED}, stop_requested=True)
    requeued, stopped = [
        finish(
            redis,
            record.id,
            Outcome(JobStatus.QUEUED, SHUTDOWN),
            Lease(redis, record, queue.spec_of(record), 30),
        )
        for record in (running, stopping)
    ]
    assert requeued is None  # not ended: back on the queue
    requeued = records.load(redis, running.id)
    assert requeued.status == JobStatus.QUEUED and requeued.attempts[-1].end_reason == "worker shut down"
    assert stopped.status == JobStatus.STOPPED  # not trained on after all
    assert stopped.attempts[-1].end_reason == "stopped on request"


def test_ended_jobs_past_the_retention_are_forgotten(redis: Redis) -> None:
    old, recent, running = (started_job(redis, max_retries=0) for _ in range(3))
    records.transition(redis, old.id, {JobStatus.STARTED}, status=JobStatus.FINISHED,
                       ended_at=records.now() - timedelta(days=31))  # fmt: skip
    records.transition(redis, recent.id, {JobStatus.STARTED}, status=JobStatus.FAILED, ended_at=records.now())
    records.append_log(redis, old.id, "a line")
    assert forget_old(redis, retention_days=30) == [old.id]
    assert records.load(redis, old.id) is None and records.read_log_page(redis, old.id, 0, 10) == []
    assert records.load(redis, recent.id) is not None and records.load(redis, running.id) is not None


def test_the_program_sees_an_allow_listed_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("API_TOKEN", "a-secret-token-of-the-api")
    monkeypatch.setenv("REDIS_URL", "redis://:password@localhost:6379/0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    env = child_environment(WorkerSettings(), None)
    assert not {"API_TOKEN", "REDIS_URL", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["PATH"] and env["NANOCHAT_BASE_DIR"] == str(tmp_path)
    assert env["NANOCHAT_METRICS_PREFIX"] == "@@metrics "


def test_empty_nccl_and_gloo_settings_are_not_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose hands the worker every documented setting, empty ones too: empty means NCCL's default."""
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/data/nanochat/cache/inductor")
    env = child_environment(WorkerSettings(), None)
    assert "NCCL_SOCKET_IFNAME" not in env and env["GLOO_SOCKET_IFNAME"] == "eth1"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/data/nanochat/cache/inductor"


def test_a_log_that_cannot_be_written_marks_the_output_lost_and_keeps_draining(
    redis: Redis, tmp_path
) -> None:
    (tmp_path / "full.log").symlink_to("/dev/full")  # every write: "No space left on device"
    with JobLog(redis, "job", tmp_path / "full.log") as job_log:
        job_log.copy_from(io.BytesIO(b'one\ntwo\n@@metrics {"step": 1}\n@@metrics 5\nthree\n'))
        job_log.flush_backlog(final=True)
    assert "No space left on device" in job_log.lost
    assert [line for _, line in records.read_log_page(redis, "job", 0, 10)] == [
        "one",
        "two",
        "@@metrics 5",
        "three",
    ]  # Redis got them
    assert [values for _, values in records.read_metrics(redis, "job")] == [{"step": 1}]


def test_a_failure_under_torchrun_is_explained_by_the_programs_last_line(redis: Redis, tmp_path) -> None:
    output = (
        b"step 1/20\n--total-batch-size 2,048 must be a multiple of rows x length x processes = 4,096\n"
        b"E1125 04:01:18.418000 7 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1)"
        b" local_rank: 0 (pid: 12) of binary: /usr/bin/python\nTraceback (most recent call last):\n"
        b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n" + b"=" * 60 + b"\n"
    )
    with JobLog(redis, "job", tmp_path / "job.log") as job_log:
        job_log.copy_from(io.BytesIO(output))
    assert job_log.last_line.startswith("--total-batch-size 2,048 must be a multiple")
    assert (tmp_path / "job.log").read_text().endswith("=" * 60 + "\n")  # the report is still logged


def test_a_queued_job_that_a_worker_let_go_of_before_starting_it_is_queued_again(redis: Redis) -> None:
    """A worker takes the RQ job off its queue, then fails before the job is marked started: its first read
    of Redis failed (RQ counts the RQ job failed), the RQ job is gone, or the worker was killed before RQ
    marked it started (still "queued", on no queue). Each would stay queued for ever."""
    spec = JOB_SPEC.validate_python({"kind": "base_train", "run": "r", "config": {}})
    failed, gone, killed, waiting = (queue.submit(redis, spec.model_copy(update={"run": r})) for r in "abcd")
    rq_queue = queue.rq_queue(redis, "gpu")
    for record in (failed, gone, killed):
        rq_queue.remove(record.rq_job_id)  # taken off the queue, as a worker does
    Job.fetch(failed.rq_job_id, connection=redis, serializer=queue.SERIALIZER).set_status(RQStatus.FAILED)
    Job.fetch(gone.rq_job_id, connection=redis, serializer=queue.SERIALIZER).delete()

    off_queue: set[str] = set()
    assert sorted(requeue_dropped(redis, off_queue)) == sorted([failed.id, gone.id])
    assert off_queue == {killed.rq_job_id}  # maybe being taken right now: one round's grace
    assert requeue_dropped(redis, off_queue) == [killed.id] and off_queue == set()
    for record in (failed, gone, killed):
        again = records.load(redis, record.id)
        assert again.status == JobStatus.QUEUED and again.rq_job_id != record.rq_job_id
        assert again.rq_job_id in rq_queue.job_ids and again.attempts == []
    assert records.load(redis, waiting.id).rq_job_id == waiting.rq_job_id  # on its queue: left alone
    assert requeue_dropped(redis, off_queue) == []
