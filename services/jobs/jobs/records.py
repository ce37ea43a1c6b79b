"""
Job records, logs and metrics in Redis, kept apart from RQ's own job data so they outlive RQ's result
TTL and a worker's death.

    nanochat:job:<id>           the record, as JSON (kind, run, config, status, attempts, progress…)
    nanochat:jobs               sorted set of ids by creation time (newest first listing)
    nanochat:jobs:status:<s>    the same, of the jobs with status s; :run:<run> and :kind:<kind> likewise
    nanochat:run:<run>:active   the same, of the active jobs that write or read the run (its own jobs,
                                and the chat stages that start from it): what the conflict checks read
    nanochat:jobs:indexed       set once every record is in the indexes above (see ensure_indexed)
    nanochat:job:<id>:log       a stream with one entry per output line
    nanochat:job:<id>:metrics   a stream with one entry per metrics record the program wrote
    nanochat:job:<id>:lease     exists while a worker runs the job (it expires when the worker dies)
    nanochat:started            ids of started jobs: what the reaper checks for expired leases
    nanochat:lock:<run>:<stage> the job writing that run's stage (one writer at a time)

Status changes go through `transition`, a compare-and-set on the status, so a stop, a reaper and a
worker acting on the same job cannot both win. Every write of a record updates its indexes in the same
transaction, so listing and the conflict checks read only what they return.
"""

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from pydantic import BaseModel
from redis import Redis, WatchError
from redis.client import Pipeline
from redis.exceptions import OutOfMemoryError

JOBS_INDEX = "nanochat:jobs"
STARTED_SET = "nanochat:started"
INDEXED = "nanochat:jobs:indexed"
INDEX_VERSION = b"1"  # a version whose records lack an index of this one's indexes them again
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
LOG_MAX_LINES = 200_000  # a long training run logs a line per step; older lines stay in the log file
METRICS_MAX_RECORDS = 500_000
FIRST_PAUSE_SECONDS, LONGEST_PAUSE_SECONDS = 0.1, 2.0  # backoff between tries of a refused Redis action
T = TypeVar("T")


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

    @property
    def runs(self) -> set[str]:
        """The runs it writes or reads: its own, and the one a chat stage starts from."""
        return {self.run} | ({self.config["source_run"]} if self.config.get("source_run") else set())


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


def status_index(status: str) -> str:
    return f"nanochat:jobs:status:{status}"


def run_index(run: str) -> str:
    return f"nanochat:jobs:run:{run}"


def kind_index(kind: str) -> str:
    return f"nanochat:jobs:kind:{kind}"


def active_index(run: str) -> str:
    return f"nanochat:run:{run}:active"


def index_keys(record: JobRecord) -> set[str]:
    """The sorted sets that list the record (each scores it by its creation time)."""
    keys = {JOBS_INDEX, status_index(record.status), run_index(record.run), kind_index(record.kind)}
    return keys | {active_index(run) for run in record.runs} if record.is_active else keys


def add(pipe: Pipeline, record: JobRecord) -> None:
    """Queue the commands that store a new record (the caller executes the pipeline)."""
    save(pipe, None, record)


def save(pipe: Pipeline, old: JobRecord | None, new: JobRecord) -> None:
    """Queue the commands that replace the record `old` (None: a new one) by `new`, indexes included."""
    pipe.set(record_key(new.id), new.model_dump_json())
    before, after = index_keys(old) if old else set(), index_keys(new)
    for key in before - after:
        pipe.zrem(key, new.id)
    for key in after - before:
        pipe.zadd(key, {new.id: new.created_at.timestamp()})


def load(redis: Redis | Pipeline, job_id: str) -> JobRecord | None:
    raw = redis.get(record_key(job_id))
    return None if raw is None else JobRecord.model_validate_json(raw)


def load_many(redis: Redis | Pipeline, job_ids: list[str]) -> list[JobRecord]:
    raws = redis.mget([record_key(i) for i in job_ids]) if job_ids else []
    return [JobRecord.model_validate_json(raw) for raw in raws if raw is not None]


INDEX_BATCH = 200  # records read per round trip


def ensure_indexed(redis: Redis) -> None:
    """Index the records an older version stored (it kept only JOBS_INDEX), once: the readers of the
    indexes call this first, which costs one GET once it is done. Each batch is a compare-and-set over
    its records, so a job changing meanwhile is indexed as it is now, never as it was."""
    if redis.get(INDEXED) == INDEX_VERSION:
        return
    start = 0
    with redis.pipeline() as pipe:
        while ids := [i.decode() for i in redis.zrange(JOBS_INDEX, start, start + INDEX_BATCH - 1)]:
            try:
                pipe.watch(*(record_key(i) for i in ids))
                found = load_many(pipe, ids)
                pipe.multi()
                for record in found:
                    for key in index_keys(record):
                        pipe.zadd(key, {record.id: record.created_at.timestamp()})
                pipe.execute()
                start += INDEX_BATCH
            except WatchError:
                continue  # a record of this batch changed: read the batch again
    with contextlib.suppress(OutOfMemoryError):  # Redis is full: the next reader marks it (reads go on)
        redis.set(INDEXED, INDEX_VERSION)


def iter_records(redis: Redis, index: str = JOBS_INDEX) -> Iterator[JobRecord]:
    """The records an index lists, newest first (read in batches)."""
    start = 0
    while ids := [i.decode() for i in redis.zrevrange(index, start, start + INDEX_BATCH - 1)]:
        yield from load_many(redis, ids)
        start += INDEX_BATCH


def active_records(redis: Redis | Pipeline, run: str) -> list[JobRecord]:
    """The active jobs that write or read the run (call ensure_indexed first)."""
    return load_many(redis, [i.decode() for i in redis.zrevrange(active_index(run), 0, -1)])


# The number of ids in every one of KEYS (sorted sets) and a page of them (ARGV: offset, limit), newest
# first, in one snapshot. One set: a range of it; several: a walk over the smallest inside Redis, so no
# id crosses the network in vain. Read-only, so it runs while Redis is out of memory too (a MULTI would
# not: Redis refuses every command queued in one then).
PAGE = """
local offset, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if #KEYS == 1 then
    local page = redis.call('ZREVRANGE', KEYS[1], offset, offset + limit - 1)
    table.insert(page, 1, redis.call('ZCARD', KEYS[1]))
    return page
end
local sizes = {}
for _, key in ipairs(KEYS) do
    sizes[key] = redis.call('ZCARD', key)
end
local keys = {unpack(KEYS)}
table.sort(keys, function(a, b) return sizes[a] < sizes[b] end)
local total, page = 0, {}
for _, id in ipairs(redis.call('ZREVRANGE', keys[1], 0, -1)) do
    local everywhere = true
    for i = 2, #keys do
        if not redis.call('ZSCORE', keys[i], id) then
            everywhere = false
            break
        end
    end
    if everywhere then
        if total >= offset and total < offset + limit then
            page[#page + 1] = id
        end
        total = total + 1
    end
end
table.insert(page, 1, total)
return page
"""


def list_records(
    redis: Redis,
    offset: int = 0,
    limit: int = 50,
    status: str | None = None,
    kind: str | None = None,
    run: str | None = None,
) -> tuple[list[JobRecord], int]:
    """A page of the filtered records, newest first, and the number of all that match. One filter (or
    none) reads one index: O(log n + page); several walk the smallest of their indexes inside Redis."""
    ensure_indexed(redis)
    filters = ((status_index, status), (kind_index, kind), (run_index, run))
    keys = [index(value) for index, value in filters if value is not None] or [JOBS_INDEX]
    total, *ids = redis.eval(PAGE, len(keys), *keys, offset, limit)
    return load_many(redis, [i.decode() for i in ids]), total


def retry_redis(
    action: Callable[[], T],
    errors: tuple[type[Exception], ...],
    seconds: float,
    report: Callable[[Exception, float], None],
) -> T:
    """Run a Redis action; while it fails with one of `errors` (Redis restarting, or out of memory: at
    maxmemory, with noeviction, Redis refuses writes rather than evict a job), `report` the failure and
    the pause, and try again after pauses that double, for up to `seconds`; then the error goes up.
    Trying again is safe: a refused transaction wrote nothing."""
    deadline, pause = time.monotonic() + seconds, FIRST_PAUSE_SECONDS
    while True:
        try:
            return action()
        except errors as error:
            if time.monotonic() + pause > deadline:
                raise
            report(error, pause)
            time.sleep(pause)
            pause = min(2 * pause, LONGEST_PAUSE_SECONDS)


def transition(
    redis: Redis,
    job_id: str,
    allowed: set[JobStatus],
    then: Callable[[Pipeline, JobRecord], None] | None = None,
    check: Callable[[Pipeline, JobRecord], None] | None = None,
    **changes: Any,
) -> JobRecord | None:
    """Apply `changes` only if the job's status is in `allowed`; returns the new record or None.
    A callable change is applied to the current record (e.g. to edit its last attempt); `then` adds
    commands to the same transaction (e.g. putting the job on RQ's queue). `check` may refuse (raise)
    on what it reads of the job's run's active jobs: they are watched too, so a job of the run starting
    or ending before the transaction commits makes it check again."""
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
                if check is not None:
                    pipe.watch(active_index(record.run))
                    check(pipe, record)
                values = {
                    name: change(record) if callable(change) else change for name, change in changes.items()
                }
                updated = record.model_copy(update=values)
                pipe.multi()
                save(pipe, record, updated)
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
        while True:
            try:
                pipe.watch(record_key(job_id))
                record = load(pipe, job_id)
                pipe.multi()
                pipe.delete(record_key(job_id), log_key(job_id), metrics_key(job_id), lease_key(job_id))
                for key in index_keys(record) if record else {JOBS_INDEX}:
                    pipe.zrem(key, job_id)
                pipe.srem(STARTED_SET, job_id)
                pipe.execute()
                return
            except WatchError:
                continue
