"""
Following a job's log or metrics as Server-Sent Events, on the async Redis client: a blocking XREAD
waits for new entries (no polling, no threadpool thread per follower), and the stream ends with an
`end` event carrying the job's final status. Followers are counted per job and in all, so a crowd of
open streams gets 429 instead of exhausting the server.
"""

import contextlib
import json
import re
import threading
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Callable

from fastapi import HTTPException, status
from fastapi.sse import KEEPALIVE_COMMENT, format_sse_event
from jobs import records
from jobs.records import JobRecord
from redis.asyncio import Redis as AsyncRedis

BLOCK_MS = 15_000  # one blocking read; a keepalive comment follows an idle one (proxies drop idle streams)
BATCH = 500
ENTRY_ID_PATTERN = r"^[0-9]{1,20}-[0-9]{1,20}$"  # [0-9]: \d takes any script's digits
LAST_ENTRY_ID = 2**64 - 1  # each part of a Redis stream id is an unsigned 64-bit number


def is_entry_id(value: str) -> bool:
    """A stream entry id that Redis reads after: the pattern, each part within 64 bits, and not the last
    id there can be (nothing comes after it: Redis refuses it as an exclusive start)."""
    if not re.fullmatch(ENTRY_ID_PATTERN, value):
        return False
    parts = tuple(int(part) for part in value.split("-"))
    return max(parts) <= LAST_ENTRY_ID and parts != (LAST_ENTRY_ID, LAST_ENTRY_ID)


class Followers:
    """Open streams, per job and in all (one API process). A stream counts from its admission until it
    ends (finished, closed by its client, or cut by an error such as a Redis restart, so that the client
    reconnecting at once finds its slot free), or until its generator is gone unstarted (the client left
    before it began)."""

    def __init__(self, per_job: int, total: int) -> None:
        self.per_job, self.total = per_job, total
        self.open: Counter[str] = Counter()
        # Routes admit from the threadpool, streams end on the event loop; reentrant, as a collection
        # inside the locked section may run a finalizer that takes it.
        self.lock = threading.RLock()

    def admit(self, job_id: str, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        with self.lock:
            if self.open[job_id] >= self.per_job or self.open.total() >= self.total:
                raise HTTPException(
                    status.HTTP_429_TOO_MANY_REQUESTS,
                    detail="too many open streams; close one or poll instead",
                    headers={"Retry-After": "5"},
                )
            self.open[job_id] += 1

        async def counted() -> AsyncIterator[bytes]:
            try:
                async with contextlib.aclosing(stream):
                    async for chunk in stream:
                        yield chunk
            finally:
                leave()

        counting = counted()
        # Called at the stream's end, or at its collection if it never started (no `finally` runs then):
        # a finalizer runs once, whichever comes first.
        leave = weakref.finalize(counting, self.leave, job_id)
        return counting

    def leave(self, job_id: str) -> None:
        with self.lock:
            self.open[job_id] -= 1
            if self.open[job_id] <= 0:
                del self.open[job_id]


async def follow(
    redis: AsyncRedis,
    job_id: str,
    key: str,
    render: Callable[[dict[bytes, bytes]], str],
    after: str | None,
) -> AsyncIterator[bytes]:
    """SSE for entries of stream `key` after entry id `after` (a reconnecting client's Last-Event-ID)
    until the job has ended and every entry is sent."""
    last = after or "0-0"
    while True:
        # The status is read before the entries: the worker writes all of a job's output before
        # it ends the job, so "ended, then nothing new" means the stream is complete.
        raw = await redis.get(records.record_key(job_id))
        record = JobRecord.model_validate_json(raw) if raw else None
        ended = record is None or not record.is_active
        reply = await redis.xread({key: last}, count=BATCH, block=None if ended else BLOCK_MS)
        entries = reply[0][1] if reply else []
        for entry_id, fields in entries:
            last = entry_id.decode()
            yield format_sse_event(data_str=render(fields), id=last)
        if ended and not entries:
            final = record.status if record else "deleted"
            yield format_sse_event(event="end", data_str=json.dumps({"status": final}))
            return
        if not entries:
            yield KEEPALIVE_COMMENT


def log_line(fields: dict[bytes, bytes]) -> str:
    return fields[b"line"].decode()


def metrics_values(fields: dict[bytes, bytes]) -> str:
    return fields[b"values"].decode()
