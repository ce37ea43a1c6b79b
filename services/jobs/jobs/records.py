"""
Job records, logs and metrics in Redis, kept apart from RQ's own job data so they outlive RQ's result
TTL and a worker's death.

    nanochat:job:<id>           the record, as JSON (kind, run, config, status, attempts, progress…)
    nanochat:jobs               sorted set of ids by creation time (newest first listing)
    nanochat:job:<id>:log       a stream with one entry per output line
    nanochat:job:<id>:metrics   a stream with one entry per metrics record the program wrote
    nanochat:job:<id>:lease     exists while a worker runs the job (it expires when the worker dies)
    nanochat:started            ids of started jobs: what the reaper checks for expired leases
    nanochat:lock:<run>:<stage> the job writing that run's stage (one writer at a time)

Status changes go through `transition`, a compare-and-set on the status, so a stop, a reaper and a
worker acting on the same job cannot both win.
"""

import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from redis import Redis, WatchError
from redis.client import Pipeline

JOBS_INDEX = "nanochat:jobs"
STARTED_SET = "nanochat:started"
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
LOG_MAX_LINES = 200_000  # a long training run logs a line per step; older lines stay in the log file
METRICS_MAX_RECORDS = 500_000


class JobStatus(StrEnum):
    WAITING = "waiting"  # for the pipeline stage before it
    QUEUED = "queued"
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"
    CANCELED = "canceled"


ACTIVE = frozenset({JobStatus.WAITING, JobStatus.QUEUED, JobStatus.STARTED})
RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED})


class Attempt(BaseModel):
    worker: str
    started_at: datetime
    resumed_from_step: int | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None


class JobRecord(BaseModel):
    id: str
    kind: str
    run: str
    config: dict[str, Any]
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: str | None = None  # why it failed, stopped or was canceled
    result: dict[str, Any] | None = None
    stop_requested: bool = False
    attempts: list[Attempt] = []
    rq_job_id: str | None = None
    pipeline_id: str | None = None  # the pipeline this stage belongs to
    stages: list[str] = []  # a pipeline's stage job ids, in order
    progress: dict[str, Any] = {}  # the latest metrics, percent done and ETA

    @classmethod
    def new(
        cls, kind: str, run: str, config: dict[str, Any], status: JobStatus = JobStatus.QUEUED
    ) -> "JobRecord":
        return cls(id=uuid.uuid4().hex, kind=kind, run=run, config=config, status=status, created_at=now())

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE

    @property
    def max_retries(self) -> int:
        return int(self.config.get("max_retries", 0))


def now() -> datetime:
    return datetime.now(UTC)


def record_key(job_id: str) -> str:
    return f"nanochat:job:{job_id}"


def log_key(job_id: str) -> str:
    return f"nanochat:job:{job_id}:log"


def metrics_key(job_id: str) -> str:
    return f"nanochat:job:{job_id}:metrics"


def lease_key(job_id: str) -> str:
    return f"nanochat:job:{job_id}:lease"


def lock_key(run: str, stage: str) -> str:
    return f"nanochat:lock:{run}:{stage}"


def add(pipe: Pipeline, record: JobRecord) -> None:
    """Queue the commands that store a new record (the caller executes the pipeline)."""
    pipe.set(record_key(record.id), record.model_dump_json())
    pipe.zadd(JOBS_INDEX, {record.id: record.created_at.timestamp()})


def save(redis: Redis | Pipeline, record: JobRecord) -> None:
    redis.set(record_key(record.id), record.model_dump_json())


def load(redis: Redis | Pipeline, job_id: str) -> JobRecord | None:
    raw = redis.get(record_key(job_id))
    return None if raw is None else JobRecord.model_validate_json(raw)


def load_many(redis: Redis | Pipeline, job_ids: list[str]) -> list[JobRecord]:
    raws = redis.mget([record_key(i) for i in job_ids]) if job_ids else []
    return [JobRecord.model_validate_json(raw) for raw in raws if raw is not None]


SCAN_BATCH = 200  # records read per round trip


def iter_records(
    redis: Redis, status: str | None = None, kind: str | None = None, run: str | None = None
) -> Iterator[JobRecord]:
    """Every record, newest first, filtered (read in batches)."""
    start = 0
    while ids := [i.decode() for i in redis.zrevrange(JOBS_INDEX, start, start + SCAN_BATCH - 1)]:
        for record in load_many(redis, ids):
            if not (
                (status and record.status != status)
                or (kind and record.kind != kind)
                or (run and record.run != run)
            ):
                yield record
        start += SCAN_BATCH


def list_records(
    redis: Redis,
    offset: int = 0,
    limit: int = 50,
    status: str | None = None,
    kind: str | None = None,
    run: str | None = None,
) -> tuple[list[JobRecord], int]:
    """A page of the filtered records, newest first, and the number of all that match."""
    page: list[JobRecord] = []
    total = 0
    for record in iter_records(redis, status, kind, run):
        if offset <= total < offset + limit:
            page.append(record)
        total += 1
    return page, total


def transition(
    redis: Redis,
    job_id: str,
    allowed: set[JobStatus],
    then: Callable[[Pipeline, JobRecord], None] | None = None,
    **changes: Any,
) -> JobRecord | None:
    """Apply `changes` only if the job's status is in `allowed`; returns the new record or None.
    A callable change is applied to the current record (e.g. to edit its last attempt); `then` adds
    commands to the same transaction (e.g. putting the job on RQ's queue)."""
    key = record_key(job_id)
    with redis.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key)
                raw = pipe.get(key)
                if raw is None:
                    return None
                record = JobRecord.model_validate_json(raw)
                if record.status not in allowed:
                    return None
                values = {
                    name: change(record) if callable(change) else change for name, change in changes.items()
                }
                updated = record.model_copy(update=values)
                pipe.multi()
                pipe.set(key, updated.model_dump_json())
                if updated.status == JobStatus.STARTED:
                    pipe.sadd(STARTED_SET, job_id)
                else:
                    pipe.srem(STARTED_SET, job_id)
                if then is not None:
                    then(pipe, updated)
                pipe.execute()
                return updated
            except WatchError:
                continue  # someone changed the record between WATCH and EXEC: read it again


def end_attempt(reason: str):
    """A change for `transition`: the last attempt ends now, for this reason."""

    def change(record: JobRecord) -> list[Attempt]:
        attempts = [a.model_copy() for a in record.attempts]
        if attempts and attempts[-1].ended_at is None:
            attempts[-1] = attempts[-1].model_copy(update={"ended_at": now(), "end_reason": reason})
        return attempts

    return change


def append_log(redis: Redis | Pipeline, job_id: str, line: str) -> None:
    redis.xadd(log_key(job_id), {"line": line}, maxlen=LOG_MAX_LINES, approximate=True)


def log_length(redis: Redis, job_id: str) -> int:
    return redis.xlen(log_key(job_id))


def read_log_page(redis: Redis, job_id: str, offset: int, limit: int) -> list[tuple[str, str]]:
    """Lines offset … offset+limit-1 (0 is the first line the stream still holds)."""
    entries = redis.xrange(log_key(job_id), "-", "+", count=offset + limit)[offset:]
    return [(entry_id.decode(), fields[b"line"].decode()) for entry_id, fields in entries]


def read_log_tail(redis: Redis, job_id: str, lines: int) -> list[tuple[str, str]]:
    entries = redis.xrevrange(log_key(job_id), "+", "-", count=lines)
    return [(entry_id.decode(), fields[b"line"].decode()) for entry_id, fields in reversed(entries)]


def append_metrics(redis: Redis | Pipeline, job_id: str, values: dict[str, Any]) -> None:
    redis.xadd(
        metrics_key(job_id), {"values": json.dumps(values)}, maxlen=METRICS_MAX_RECORDS, approximate=True
    )


def read_metrics(
    redis: Redis, job_id: str, after: str | None = None, count: int | None = None
) -> list[tuple[str, dict[str, Any]]]:
    start = "-" if after is None else f"({after}"
    return [
        (entry_id.decode(), json.loads(fields[b"values"]))
        for entry_id, fields in redis.xrange(metrics_key(job_id), start, count=count)
    ]


def delete(redis: Redis, job_id: str) -> None:
    """The record, its log and metrics (never its checkpoints: those are files of the run)."""
    with redis.pipeline() as pipe:
        pipe.delete(record_key(job_id), log_key(job_id), metrics_key(job_id), lease_key(job_id))
        pipe.zrem(JOBS_INDEX, job_id)
        pipe.srem(STARTED_SET, job_id)
        pipe.execute()
