"""The workers: which are alive, what each runs, and how many jobs wait on each queue."""

from fastapi import APIRouter, Depends
from jobs.workers import Workers, overview

from api.deps import RedisDep, require_read_token
from api.routes.jobs import ERRORS

router = APIRouter(prefix="/workers", tags=["workers"])


@router.get("", dependencies=[Depends(require_read_token)], responses=ERRORS)
def list_workers(redis: RedisDep) -> Workers:
    """Live workers (their queues, busy or idle, the job each runs) and, per queue, the jobs waiting on
    it and the workers that take from it: a queue with jobs waiting and no worker needs one started."""
    return overview(redis)
