"""
Finding abandoned jobs: a started job whose lease has expired lost its worker (SIGKILL, a vanished
machine). Every worker runs this check in a thread, so an abandoned job is re-queued within about
two leases of its worker's death (its lease expires, then stays missing for a lease) even when
nobody looks at it. The new attempt resumes from the job's latest checkpoint; after max_retries lost
workers the job fails. A worker that died between writing a pipeline stage's outcome and queuing the
next stage leaves the pipeline waiting: the same thread queues that stage (or cancels the later ones)
once the stage has been over for a lease. A queued job whose RQ job a worker took but never started
(its first read of Redis failed, or it was killed right then) is put on its queue again. It also
deletes the records of jobs that ended longer ago than the retention period.
"""

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from jobs import queue, records
from jobs.records import JobRecord, JobStatus
from redis import Redis
from redis.client import Pipeline
from redis.exceptions import RedisError
from rq.job import Job
from rq.job import JobStatus as RQStatus

log = logging.getLogger("worker")
LOST = "worker lost"
CLEANUP_SECONDS = 3600  # how often old job records are looked for


def reap(redis: Redis, lease_seconds: float, missing_since: dict[str, float]) -> list[str]:
    """Re-queue (or fail) every started job whose lease this reaper has seen missing for a whole lease
    period (a lease that expired while Redis was down is renewed as soon as its worker reaches Redis
    again); returns their ids. `missing_since` carries what was seen from one round to the next."""
    reaped, now = [], time.monotonic()
    started = {raw_id.decode() for raw_id in redis.smembers(records.STARTED_SET)}
    for job_id in set(missing_since) - started:
        del missing_since[job_id]
    for job_id in started:
        if redis.exists(records.lease_key(job_id)):
            missing_since.pop(job_id, None)
            continue
        if now - missing_since.setdefault(job_id, now) < lease_seconds:
            continue
        del missing_since[job_id]
        record = records.load(redis, job_id)
        if record is None or record.status != JobStatus.STARTED:
            continue  # it moved on meanwhile (transition keeps the started set itself)
        worker = record.attempts[-1].worker if record.attempts else "?"
        reason = f"{LOST}: no heartbeat from {worker} for over {lease_seconds:.0f} s"
        if record.stop_requested:  # it was being stopped: stopped it is (its program got SIGTERM)
            stopped = records.transition(
                redis, job_id, {JobStatus.STARTED}, status=JobStatus.STOPPED, ended_at=records.now(),
                error="stopped on request (its worker was lost meanwhile)",
                attempts=records.end_attempt(reason),
            )  # fmt: skip
            if stopped is not None:
                queue.stage_ended(redis, stopped)
            reaped.append(job_id)
            continue
        requeue_lost(redis, record, reason)
        reaped.append(job_id)
    return reaped


def requeue_lost(redis: Redis, record: JobRecord, reason: str) -> None:
    """A started job lost a worker (`reason` starts with LOST): re-queue it, or fail it once it has
    lost more than max_retries workers."""
    lost = 1 + sum((a.end_reason or "").startswith(LOST) for a in record.attempts[:-1])
    if lost <= record.max_retries:
        if queue.enqueue(redis, record.id, {JobStatus.STARTED}, attempts=records.end_attempt(reason)):
            log.warning("job %s: %s; re-queued (retry %d of %d)", record.id, reason, lost, record.max_retries)
        return
    failed = records.transition(
        redis,
        record.id,
        {JobStatus.STARTED},
        status=JobStatus.FAILED,
        ended_at=records.now(),
        error=f"{reason} ({lost} workers lost; max_retries is {record.max_retries})",
        attempts=records.end_attempt(reason),
    )
    if failed is not None:
        queue.stage_ended(redis, failed)


# RQ's states of a job that a worker has taken and let go of: a job of ours still queued with one of
# these, or with no RQ job left at all, will never be taken again.
LET_GO = {RQStatus.FINISHED, RQStatus.FAILED, RQStatus.STOPPED, RQStatus.CANCELED}


def requeue_dropped(redis: Redis, off_queue: set[str]) -> list[str]:
    """Put back on its queue every queued job whose RQ job is gone, was let go of, or was taken off its
    queue and never started: its worker failed between taking it and marking it started (Redis
    unreachable for a moment, a SIGKILL). A worker takes an RQ job off its queue a moment before RQ marks
    it started, so an RQ job seen off its queue but not started counts only when it was so in the round
    before too: `off_queue` carries those from one round to the next. Returns the jobs' ids."""
    records.ensure_indexed(redis)
    queued = [r for r in records.iter_records(redis, records.status_index(JobStatus.QUEUED)) if r.rq_job_id]
    rq_jobs = Job.fetch_many([r.rq_job_id for r in queued], connection=redis, serializer=queue.SERIALIZER)
    on_a_queue = {rq_id for kind in queue.QUEUE_NAMES for rq_id in queue.rq_queue(redis, kind).job_ids}
    seen_off, dropped = set(), []
    for record, rq_job in zip(queued, rq_jobs, strict=True):
        status = rq_job.get_status(refresh=False) if rq_job is not None else None
        if status == RQStatus.QUEUED and record.rq_job_id not in on_a_queue:
            if record.rq_job_id not in off_queue:
                seen_off.add(record.rq_job_id)
                continue  # maybe a worker is taking it right now: look again next round
        elif rq_job is not None and status not in LET_GO:
            continue  # on its queue, or started
        try:  # only while it is the same queued attempt (another worker's reaper may have been first)
            requeued = queue.enqueue(redis, record.id, {JobStatus.QUEUED}, check=same_attempt(record))
        except queue.Conflict:
            continue
        if requeued:
            log.warning("job %s: its worker let it go before starting it; queued again", record.id)
            dropped.append(record.id)
    off_queue.clear()
    off_queue.update(seen_off)
    return dropped


def same_attempt(seen: JobRecord) -> Callable[[Pipeline, JobRecord], None]:
    def check(pipe: Pipeline, current: JobRecord) -> None:
        if current.rq_job_id != seen.rq_job_id:
            raise queue.Conflict(f"job {seen.id} was queued again meanwhile")

    return check


def repair_pipelines(redis: Redis, lease_seconds: float) -> list[str]:
    """Do what queue.stage_ended did not for a pipeline none of whose stages is queued or started: queue
    the stage after the last one that ended (or cancel the later ones), or settle the pipeline when every
    stage has ended. A stage that ended less than a lease ago is left to its own worker, which may be
    doing just that (and stage_ended's compare-and-sets make a double repair harmless). Returns the ids
    of the pipelines repaired."""
    records.ensure_indexed(redis)
    cutoff = records.now() - timedelta(seconds=lease_seconds)
    on_the_move = (JobStatus.QUEUED, JobStatus.STARTED)
    listed = [r for status in on_the_move for r in records.iter_records(redis, records.status_index(status))]
    repaired = []
    for pipeline in (r for r in listed if r.kind == "pipeline"):
        stages = records.load_many(redis, pipeline.stages)
        if any(s.status in on_the_move for s in stages):
            continue  # its worker carries the pipeline on
        ended = [s for s in stages if not s.is_active]  # the stages before the waiting ones
        last = ended[-1] if ended else None
        if last is None or last.ended_at is None or last.ended_at > cutoff:
            continue
        if len(ended) < len(stages):
            queue.stage_ended(redis, last)
        else:
            queue.settle_pipeline(redis, pipeline.id)
        log.warning("pipeline %s: stage %s %s, but the rest was left undone; repaired", pipeline.id,
                    last.kind, last.status)  # fmt: skip
        repaired.append(pipeline.id)
    return repaired


def forget_old(redis: Redis, retention_days: float) -> list[str]:
    """Delete the records, logs and metrics of jobs that ended over `retention_days` ago (a pipeline
    with its stages; checkpoints are files of the run and stay)."""
    cutoff = records.now() - timedelta(days=retention_days)
    old = [
        r.id
        for r in records.iter_records(redis)
        if not r.is_active and r.pipeline_id is None and r.ended_at is not None and r.ended_at < cutoff
    ]
    for job_id in old:
        queue.delete(redis, job_id)
    return old


def start_reaper(redis: Redis, lease_seconds: float, retention_days: float) -> threading.Thread:
    def loop() -> None:
        missing_since: dict[str, float] = {}
        off_queue: set[str] = set()
        last_cleanup = 0.0
        while True:
            steps = [
                lambda: reap(redis, lease_seconds, missing_since),
                lambda: requeue_dropped(redis, off_queue),
                lambda: repair_pipelines(redis, lease_seconds),
            ]
            if time.monotonic() - last_cleanup > CLEANUP_SECONDS:
                steps.append(lambda: forget_old(redis, retention_days))
                last_cleanup = time.monotonic()
            for step in steps:  # each on its own: one that fails does not keep the others from running
                try:
                    step()
                except RedisError as error:  # Redis restarting: try again next round
                    log.warning("reaper: Redis unreachable: %s", error)
                except Exception:
                    log.exception("reaper step failed")
            time.sleep(lease_seconds / 3)

    thread = threading.Thread(target=loop, name="reaper", daemon=True)
    thread.start()
    return thread
