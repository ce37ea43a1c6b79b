"""Following a job's log as Server-Sent Events: one event per line, then an `end` event."""

import asyncio
import json
import time
from collections.abc import AsyncIterator

from fastapi.concurrency import run_in_threadpool
from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event
from redis import Redis

from worker import queue, records
from worker.records import JobRecord

POLL_SECONDS = 0.25
KEEPALIVE_SECONDS = 15.0  # proxies drop idle connections; a comment line keeps them open


def poll(redis: Redis, job_id: str, after: str | None) -> tuple[JobRecord | None, list[tuple[str, str]]]:
    # The status is read before the lines: the worker appends all lines before it ends a job, so an
    # ended status followed by no new lines means the log is complete.
    record = queue.get(redis, job_id)
    return record, records.read_log(redis, job_id, after)


async def follow(redis: Redis, job_id: str, after: str | None = None) -> AsyncIterator[bytes]:
    """SSE bytes for lines after entry id `after` (a reconnecting client's Last-Event-ID) until the end."""
    last_sent = time.monotonic()
    while True:
        record, entries = await run_in_threadpool(poll, redis, job_id, after)
        for entry_id, line in entries:
            yield format_sse_event(data_str=line, id=entry_id)
            after, last_sent = entry_id, time.monotonic()
        if record is None or (not record.is_active and not entries):
            status = record.status if record else "unknown"
            yield format_sse_event(event="end", data_str=json.dumps({"status": status}))
            return
        if not entries:
            if time.monotonic() - last_sent > KEEPALIVE_SECONDS:
                yield KEEPALIVE_COMMENT
                last_sent = time.monotonic()
            await asyncio.sleep(POLL_SECONDS)
