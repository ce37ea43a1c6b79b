from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, status
from fastapi.responses import PlainTextResponse
from fastapi.sse import EventSourceResponse

from api import logs
from api.deps import RedisDep, SettingsDep, require_token
from worker import queue, records
from worker.records import JobRecord
from worker.specs import AnyJobSpec

router = APIRouter(prefix="/jobs", tags=["jobs"])


def found(record: JobRecord | None, job_id: str) -> JobRecord:
    if record is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no job {job_id}")
    return record


@router.post("", status_code=status.HTTP_201_CREATED, dependencies=[Depends(require_token)])
def submit_job(spec: AnyJobSpec, redis: RedisDep, settings: SettingsDep) -> JobRecord:
    """Validate a job spec and put it on the queue."""
    return queue.submit(redis, spec, result_ttl=settings.job_result_ttl)


@router.get("")
def list_jobs(
    redis: RedisDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[JobRecord]:
    """Jobs, newest first."""
    return records.list_records(redis, offset=offset, limit=limit)


@router.get("/{job_id}")
def get_job(job_id: str, redis: RedisDep) -> JobRecord:
    return found(queue.get(redis, job_id), job_id)


@router.post("/{job_id}/cancel", dependencies=[Depends(require_token)])
def cancel_job(job_id: str, redis: RedisDep) -> JobRecord:
    """Cancel a queued job, or stop a running one (its program gets SIGTERM and checkpoints first)."""
    try:
        return found(queue.cancel(redis, job_id), job_id)
    except queue.CannotCancel as error:
        raise HTTPException(status.HTTP_409_CONFLICT, detail=str(error)) from error


@router.get(
    "/{job_id}/logs",
    response_class=PlainTextResponse,
    response_model=None,
    responses={200: {"content": {"text/plain": {}, "text/event-stream": {}}}},
)
def get_logs(
    job_id: str,
    redis: RedisDep,
    follow: bool = False,
    last_event_id: Annotated[str | None, Header()] = None,
) -> PlainTextResponse | EventSourceResponse:
    """
    The job's log so far as text; with follow=true, Server-Sent Events: one `data:` event per line
    (its `id` is the resume point for Last-Event-ID), then an `end` event with the final status.
    """
    found(records.load(redis, job_id), job_id)
    if follow:
        return EventSourceResponse(logs.follow(redis, job_id, after=last_event_id))
    return PlainTextResponse("".join(line + "\n" for _, line in records.read_log(redis, job_id)))
