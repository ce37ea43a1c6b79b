"""
Job records and logs in Redis, kept apart from RQ's own job data so they outlive RQ's result TTL.

    nanochat:job:<id>       the record, as JSON (kind, run, config, status, times, error, result)
    nanochat:jobs           sorted set of ids by creation time (newest first listing)
    nanochat:job:<id>:log   a stream with one entry per output line (read whole, or followed)

Status changes go through `transition`, a compare-and-set on the status, so a cancel and a worker
starting the same job cannot both win.
"""

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from redis import Redis, WatchError
from redis.client import Pipeline

from worker.specs import JobSpec

JOBS_INDEX = "nanochat:jobs"
LOG_MAX_LINES = 200_000  # a long training run logs a line per step; older lines stay in the log file


class JobStatus(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELED = "canceled"


ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.STARTED})


class JobRecord(BaseModel):
    id: str
    kind: str
    run: str
    config: dict[str, Any]
    status: JobStatus
    created_at: datetime
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    cancel_requested: bool = False

    @classmethod
    def new(cls, spec: JobSpec) -> "JobRecord":
        return cls(
            id=uuid.uuid4().hex,
            kind=spec.kind,
            run=spec.run,
            config=spec.config.model_dump(),
            status=JobStatus.QUEUED,
            created_at=now(),
        )

    @property
    def is_active(self) -> bool:
        return self.status in ACTIVE


def now() -> datetime:
    return datetime.now(UTC)


def record_key(job_id: str) -> str:
    return f"nanochat:job:{job_id}"


def log_key(job_id: str) -> str:
    return f"nanochat:job:{job_id}:log"


def add(pipe: Pipeline, record: JobRecord) -> None:
    """Queue the commands that store a new record (the caller executes the pipeline)."""
    pipe.set(record_key(record.id), record.model_dump_json())
    pipe.zadd(JOBS_INDEX, {record.id: record.created_at.timestamp()})


def load(redis: Redis, job_id: str) -> JobRecord | None:
    raw = redis.get(record_key(job_id))
    return None if raw is None else JobRecord.model_validate_json(raw)


def list_records(redis: Redis, offset: int = 0, limit: int = 50) -> list[JobRecord]:
    """Newest first."""
    ids = redis.zrevrange(JOBS_INDEX, offset, offset + limit - 1)
    raws = redis.mget([record_key(i.decode()) for i in ids]) if ids else []
    return [JobRecord.model_validate_json(raw) for raw in raws if raw is not None]


def transition(redis: Redis, job_id: str, allowed: set[JobStatus], **changes: Any) -> JobRecord | None:
    """Apply `changes` only if the job's status is in `allowed`; returns the new record or None."""
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
                updated = record.model_copy(update=changes)
                pipe.multi()
                pipe.set(key, updated.model_dump_json())
                pipe.execute()
                return updated
            except WatchError:
                continue  # someone changed the record between WATCH and EXEC: read it again


def append_log(redis: Redis, job_id: str, line: str) -> None:
    redis.xadd(log_key(job_id), {"line": line}, maxlen=LOG_MAX_LINES, approximate=True)


def read_log(redis: Redis, job_id: str, after: str | None = None) -> list[tuple[str, str]]:
    """(entry id, line) pairs, all of them or those after the entry id `after`."""
    start = "-" if after is None else f"({after}"
    return [
        (entry_id.decode(), fields[b"line"].decode())
        for entry_id, fields in redis.xrange(log_key(job_id), start)
    ]
