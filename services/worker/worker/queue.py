"""The control plane's side of the queue: submit, cancel, and read jobs with RQ's view reconciled."""

import contextlib

from redis import Redis
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.job import JobStatus as RQStatus

from worker import records
from worker.records import JobRecord, JobStatus
from worker.specs import JobSpec

QUEUE_NAME = "nanochat-jobs"
TASK = "worker.tasks.run_job"


def submit(redis: Redis, spec: JobSpec, result_ttl: int) -> JobRecord:
    """Store the record and enqueue the RQ job in one transaction: both exist, or neither."""
    record = JobRecord.new(spec)
    queue = Queue(QUEUE_NAME, connection=redis)
    with redis.pipeline() as pipe:
        pipe.multi()  # one MULTI/EXEC for our commands and RQ's
        records.add(pipe, record)
        # timeout=-1: training runs for hours; cancellation goes through our own cancel path instead.
        queue.enqueue_call(
            TASK, args=(record.id,), job_id=record.id, timeout=-1, result_ttl=result_ttl, pipeline=pipe
        )
        pipe.execute()
    return record


class CannotCancel(Exception):
    """The job has already ended."""


def cancel(redis: Redis, job_id: str) -> JobRecord | None:
    """
    Cancel a job: a queued one is canceled at once (and leaves RQ's queue); a started one is asked to
    stop, and its worker stops the program (SIGTERM, so a trainer saves a checkpoint first).
    Returns None for an unknown id; raises CannotCancel for a job that has ended.
    """
    record = records.transition(
        redis, job_id, {JobStatus.QUEUED}, status=JobStatus.CANCELED, ended_at=records.now()
    )
    if record is not None:
        # Already picked up (the worker then sees the canceled record and skips it) or gone: fine.
        with contextlib.suppress(NoSuchJobError, InvalidJobOperation):
            Job.fetch(job_id, connection=redis).cancel()
        return record
    record = records.transition(redis, job_id, {JobStatus.STARTED}, cancel_requested=True)
    if record is not None:
        return record
    record = records.load(redis, job_id)
    if record is None:
        return None
    raise CannotCancel(f"job {job_id} has already ended ({record.status})")


def get(redis: Redis, job_id: str) -> JobRecord | None:
    """The job's record; an active job whose RQ job failed without our task noticing is marked failed."""
    record = records.load(redis, job_id)
    if record is None or not record.is_active:
        return record
    try:
        rq_job = Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        return record
    if rq_job.get_status() not in (RQStatus.FAILED, RQStatus.STOPPED):
        return record
    # The work horse died (killed, out of memory) before the task could write the outcome.
    latest = rq_job.latest_result()
    reason = (latest.exc_string or "").strip().splitlines() if latest else []
    error = "the worker lost this job" + (f": {reason[-1]}" if reason else "")
    updated = records.transition(
        redis, job_id, set(records.ACTIVE), status=JobStatus.FAILED, ended_at=records.now(), error=error
    )
    return updated or records.load(redis, job_id)
