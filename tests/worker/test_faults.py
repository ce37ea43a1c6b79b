"""What a worker leaves behind when it dies at the wrong moment, and Redis out of memory, on a real Redis:
the reaper repairs a pipeline whose next stage was never queued, and the worker's writes wait for room."""

import logging
import threading
from datetime import timedelta

import pytest
from jobs import queue, records
from jobs.records import Attempt, JobRecord, JobStatus
from jobs.specs import JOB_SPEC
from redis import Redis

from worker import reaper
from worker.tasks import Lease, Outcome, finish, patiently

LEASE = 3.0


def pipeline(redis: Redis, run: str) -> tuple[JobRecord, list[JobRecord]]:
    """A submitted pipeline (tokenizer → base → sft → chat_eval) and its stages."""
    submitted = queue.submit(redis, JOB_SPEC.validate_python({"kind": "pipeline", "run": run, "config": {}}))
    return submitted, records.load_many(redis, submitted.stages)


def run_stage(redis: Redis, stage: JobRecord, status: JobStatus, ended_ago: float) -> None:
    """What a worker does with a stage up to writing its outcome, and then dies (stage_ended never runs)."""
    records.transition(
        redis, stage.id, {JobStatus.QUEUED}, status=JobStatus.STARTED, started_at=records.now(),
        attempts=[Attempt(worker="gone", started_at=records.now())],
    )  # fmt: skip
    ended = records.now() - timedelta(seconds=ended_ago)
    records.transition(redis, stage.id, {JobStatus.STARTED}, status=status, ended_at=ended)


def test_the_reaper_queues_the_next_stage_that_a_dying_worker_never_queued(redis: Redis) -> None:
    stuck, (tokenizer, base, *_) = pipeline(redis, "stuck")
    _, (fresh, fresh_base, *_) = pipeline(redis, "fresh")
    run_stage(redis, tokenizer, JobStatus.FINISHED, ended_ago=2 * LEASE)
    run_stage(redis, fresh, JobStatus.FINISHED, ended_ago=0)  # its worker may be queuing the next one now

    assert reaper.repair_pipelines(redis, LEASE) == [stuck.id]
    queued = records.load(redis, base.id)
    assert queued.status == JobStatus.QUEUED and queued.rq_job_id in queue.rq_queue(redis, "gpu").job_ids
    progress = records.load(redis, stuck.id).progress
    assert progress["current_stage"] == "base_train" and progress["stages_finished"] == 1
    assert records.load(redis, fresh_base.id).status == JobStatus.WAITING
    assert reaper.repair_pipelines(redis, LEASE) == []  # nothing left to repair: the base stage is queued


def test_the_reaper_cancels_the_stages_after_a_failed_one_and_ends_the_pipeline(redis: Redis) -> None:
    failed, (tokenizer, *later) = pipeline(redis, "failing")
    run_stage(redis, tokenizer, JobStatus.FAILED, ended_ago=2 * LEASE)
    assert reaper.repair_pipelines(redis, LEASE) == [failed.id]
    assert {s.status for s in records.load_many(redis, [s.id for s in later])} == {JobStatus.CANCELED}
    assert records.load(redis, failed.id).status == JobStatus.FAILED


def test_the_reaper_ends_a_pipeline_whose_last_stage_ended_unannounced(redis: Redis) -> None:
    done, stages = pipeline(redis, "done")
    for stage in stages[:-1]:
        run_stage(redis, stage, JobStatus.FINISHED, ended_ago=2 * LEASE)
        queue.stage_ended(redis, records.load(redis, stage.id))
    run_stage(redis, stages[-1], JobStatus.FINISHED, ended_ago=2 * LEASE)
    assert records.load(redis, done.id).status == JobStatus.STARTED  # stale: no one settled it
    assert reaper.repair_pipelines(redis, LEASE) == [done.id]
    assert records.load(redis, done.id).status == JobStatus.FINISHED


@pytest.fixture
def full_redis(redis: Redis) -> Redis:
    """Redis at its maxmemory (noeviction): it refuses every write until room is made."""
    redis.config_set("maxmemory", 1)
    yield redis
    redis.config_set("maxmemory", 0)


def test_an_outcome_refused_for_want_of_memory_is_written_once_redis_has_room(
    full_redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    full_redis.config_set("maxmemory", 0)
    _, (stage, *_) = pipeline(full_redis, "oom")
    run_stage(full_redis, stage, JobStatus.STARTED, ended_ago=0)
    record = records.load(full_redis, stage.id)
    lease = Lease(full_redis, record, queue.spec_of(record), LEASE)
    full_redis.config_set("maxmemory", 1)
    room = threading.Timer(1.5, full_redis.config_set, ("maxmemory", 0))
    room.start()
    with caplog.at_level(logging.WARNING, logger="worker"):
        final = patiently(lambda: finish(full_redis, stage.id, Outcome(JobStatus.FINISHED), lease))
    room.join()
    assert final is not None and records.load(full_redis, stage.id).status == JobStatus.FINISHED
    assert "Redis is out of memory" in caplog.text and "retrying in" in caplog.text
