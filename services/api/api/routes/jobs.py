"""Jobs: submit, list, read, stop, retry, delete; logs and metrics, whole, paged or followed live."""

import logging
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response, status
from fastapi.responses import PlainTextResponse
from fastapi.sse import EventSourceResponse
from jobs import files, queue, records, specs
from jobs.records import JOB_ID_PATTERN, JobRecord, JobStatus
from jobs.specs import AnyJobSpec, JobSpec
from pydantic import AfterValidator, BaseModel
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import OutOfMemoryError

from api import streams
from api.config import Settings
from api.deps import AsyncRedisDep, RedisDep, SettingsDep, require_read_token, require_token

router = APIRouter(prefix="/jobs", tags=["jobs"])
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="32 hex digits")]
LastEventId = Annotated[str | None, Header(description="resume after this entry id (SSE reconnect)")]
MAX_OFFSET = 10_000_000
OOM_RETRY_SECONDS = 3.0  # how long a change waits for room in a full Redis before it is a 503
T = TypeVar("T")
log = logging.getLogger("api")
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong bearer token"},
    413: {"description": "request body too large"},
    422: {"description": "invalid parameters or body"},
    503: {"description": "Redis is unreachable, or out of memory"},
}
JSON_BODY = {400: {"description": "the body is not UTF-8 (JSON's encoding)"}}
NOT_FOUND = {404: {"description": "no such job"}}
CONFLICT = {409: {"description": "not possible in the job's current state"}}
STREAM = {
    200: {"content": {"text/plain": {}, "application/json": {}, "text/event-stream": {}}},
    400: {"description": "malformed Last-Event-ID"},
    429: {"description": "too many open streams"},
}


class JobPage(BaseModel):
    jobs: list[JobRecord]
    total: int
    offset: int
    limit: int


class MetricsPoint(BaseModel):
    id: str  # the entry id: pass it as ?after= to get only newer points
    values: dict[str, Any]


def found(record: JobRecord | None, job_id: str) -> JobRecord:
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id}")
    return record


def conflict(error: queue.Conflict) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, detail=str(error))


def with_room(change: Callable[[], T]) -> T:
    """Make a change; while Redis refuses it for want of memory, try again with backoff (a refused
    transaction wrote nothing), then let the 503 say so."""

    def report(error: Exception, pause: float) -> None:
        log.warning("Redis is out of memory (%s): retrying in %.1f s", error, pause)

    return records.retry_redis(change, (OutOfMemoryError,), OOM_RETRY_SECONDS, report)


def valid_entry_id(value: str | None, name: str) -> str | None:
    if value is not None and not streams.is_entry_id(value):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=f"{name} must look like 1712345678901-0")
    return value


def entry_id_param(value: str | None) -> str | None:
    """A query parameter's check (422 when it fails), as valid_entry_id's for a header."""
    if value is not None and not streams.is_entry_id(value):
        raise ValueError("must be a stream entry id like 1712345678901-0, each part below 2**64")
    return value


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_token)],
    responses={**ERRORS, **CONFLICT, **JSON_BODY},
)
def submit_job(spec: AnyJobSpec, redis: RedisDep, settings: SettingsDep) -> JobRecord:
    """Validate a job spec and queue it (a pipeline queues its first stage; the others wait).
    409 while another job writes the same run's stage, or when it names an uploaded file not ready."""
    return submit(redis, settings, spec)


def submit(redis: Redis, settings: Settings, spec: JobSpec) -> JobRecord:
    """Queue a job (every route that starts one: this one, the models' export and import)."""
    try:
        files.check_usable(redis, settings.base_dir, spec)
        return with_room(lambda: queue.submit(redis, spec))
    except (queue.Conflict, files.Unusable) as error:
        raise conflict(error) from error


@router.get("/schema", dependencies=[Depends(require_read_token)], responses=ERRORS)
def job_schema() -> dict[str, dict]:
    """The JSON Schema of every job kind, with defaults, bounds and descriptions."""
    return specs.json_schemas()


@router.get("", dependencies=[Depends(require_read_token)], responses=ERRORS)
def list_jobs(
    redis: RedisDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    kind: Annotated[str | None, Query(max_length=32)] = None,
    run: Annotated[str | None, Query(pattern=specs.NAME_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> JobPage:
    """Jobs, newest first, filtered by status, kind and run; `total` counts all that match."""
    jobs, total = records.list_records(redis, offset=offset, limit=limit, status=status_, kind=kind, run=run)
    return JobPage(jobs=jobs, total=total, offset=offset, limit=limit)


@router.get("/{job_id}", dependencies=[Depends(require_read_token)], responses={**ERRORS, **NOT_FOUND})
def get_job(job_id: JobId, redis: RedisDep) -> JobRecord:
    """The record: status, attempts, and `progress` (latest metrics, percent done, ETA)."""
    return found(records.load(redis, job_id), job_id)


@router.post(
    "/{job_id}/stop", dependencies=[Depends(require_token)], responses={**ERRORS, **NOT_FOUND, **CONFLICT}
)
def stop_job(job_id: JobId, redis: RedisDep) -> JobRecord:
    """Stop a job: a queued one is canceled; a running one gets SIGTERM (it saves a checkpoint), then
    SIGKILL after the grace period, and ends `stopped`. Later pipeline stages are canceled."""
    try:
        return found(with_room(lambda: queue.stop(redis, job_id)), job_id)
    except queue.Conflict as error:
        raise conflict(error) from error


router.add_api_route(
    "/{job_id}/cancel",
    stop_job,
    methods=["POST"],
    dependencies=[Depends(require_token)],
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    summary="Cancel Job (same as stop)",
)


@router.post(
    "/{job_id}/retry", dependencies=[Depends(require_token)], responses={**ERRORS, **NOT_FOUND, **CONFLICT}
)
def retry_job(job_id: JobId, redis: RedisDep) -> JobRecord:
    """Queue a failed, stopped or canceled job again; it resumes from its latest checkpoint."""
    try:
        return found(with_room(lambda: queue.retry(redis, job_id)), job_id)
    except queue.Conflict as error:
        raise conflict(error) from error


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    dependencies=[Depends(require_token)],
    responses={**ERRORS, **NOT_FOUND, **CONFLICT},
)
def delete_job(job_id: JobId, redis: RedisDep) -> Response:
    """Remove an ended job's record, log and metrics; its checkpoints stay."""
    try:
        deleted = with_room(lambda: queue.delete(redis, job_id))
    except queue.Conflict as error:
        raise conflict(error) from error
    if not deleted:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def follow(
    request: Request, redis: AsyncRedis, job_id: str, key: str, render, after: str | None
) -> EventSourceResponse:
    followers: streams.Followers = request.app.state.followers
    return EventSourceResponse(followers.admit(job_id, streams.follow(redis, job_id, key, render, after)))


@router.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    response_model=None,
    dependencies=[Depends(require_read_token)],
    responses={**ERRORS, **NOT_FOUND, **STREAM},
)
def get_logs(
    job_id: JobId,
    request: Request,
    redis: RedisDep,
    async_redis: AsyncRedisDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="first line to return")] = 0,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
    tail: Annotated[int | None, Query(ge=1, le=100_000, description="the last N lines instead")] = None,
    follow_: Annotated[bool, Query(alias="follow")] = False,
    last_event_id: LastEventId = None,
) -> PlainTextResponse | EventSourceResponse:
    """
    A page of the job's log as text (`X-Log-Lines` holds the number of lines); with follow=true,
    Server-Sent Events: one `data:` event per line (its `id` is the resume point for Last-Event-ID),
    then an `end` event with the final status.
    """
    found(records.load(redis, job_id), job_id)
    if follow_:
        after = valid_entry_id(last_event_id, "Last-Event-ID")
        return follow(request, async_redis, job_id, records.log_key(job_id), streams.log_line, after)
    if tail is not None:
        lines = records.read_log_tail(redis, job_id, tail)
    else:
        lines = records.read_log_page(redis, job_id, offset, limit)
    total = str(records.log_length(redis, job_id))
    return PlainTextResponse("".join(line + "\n" for _, line in lines), headers={"X-Log-Lines": total})


@router.get(
    "/{job_id}/metrics",
    response_model=None,
    dependencies=[Depends(require_read_token)],
    responses={**ERRORS, **NOT_FOUND, **STREAM},
)
def get_metrics(
    job_id: JobId,
    request: Request,
    redis: RedisDep,
    async_redis: AsyncRedisDep,
    after: Annotated[
        str | None,
        Query(pattern=streams.ENTRY_ID_PATTERN, description="only newer points"),
        AfterValidator(entry_id_param),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
    follow_: Annotated[bool, Query(alias="follow")] = False,
    last_event_id: LastEventId = None,
) -> list[MetricsPoint] | EventSourceResponse:
    """
    The metrics the program wrote, one point per record (step, loss, val_bpb, lrm, tok_per_s, mfu,
    progress…): all, or those after `after` (incremental polling); with follow=true, Server-Sent
    Events whose data is the point's JSON, then an `end` event.
    """
    found(records.load(redis, job_id), job_id)
    if follow_:
        start = valid_entry_id(last_event_id, "Last-Event-ID") or after
        return follow(
            request, async_redis, job_id, records.metrics_key(job_id), streams.metrics_values, start
        )
    points = records.read_metrics(redis, job_id, after, count=limit)
    return [MetricsPoint(id=entry_id, values=values) for entry_id, values in points]
