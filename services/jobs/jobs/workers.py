"""
Who takes the jobs: the live RQ workers (the queues each takes from, the job it runs) and how many jobs
wait on each queue, so that a job left `queued` because no worker takes its queue says so. A worker
that dies without a word stays listed until its registration expires (RQ renews it while the worker
lives: within about 90 s of a busy worker's death, 8 min of an idle one's).
"""

from datetime import datetime

from pydantic import BaseModel
from redis import Redis
from rq import Worker
from rq.worker import WorkerStatus

from jobs.queue import QUEUE_NAMES, rq_queue


class WorkerView(Worker):
    """RQ's worker as another process reads it. RQ raises the socket timeout of the client a Worker is
    built on to minutes (its own dequeue blocks that long); the API's client must keep its own."""

    def _set_connection(self, connection: Redis) -> Redis:
        return connection


class WorkerInfo(BaseModel):
    name: str
    queues: list[str]  # "gpu", "cpu": the queues it takes from, the first first
    busy: bool
    job_id: str | None  # the job it runs (for a multi-node job's further node too)
    started_at: datetime | None
    last_heartbeat: datetime | None


class QueueInfo(BaseModel):
    name: str  # "gpu": training and evaluation; "cpu": the jobs that use no GPU
    waiting: int  # jobs on it that no worker has taken yet
    workers: int  # live workers that take from it


class Workers(BaseModel):
    workers: list[WorkerInfo]
    queues: list[QueueInfo]


def overview(redis: Redis) -> Workers:
    kind_of = {name: kind for kind, name in QUEUE_NAMES.items()}
    workers = []
    for worker in sorted(WorkerView.all(connection=redis), key=lambda w: w.name):
        try:
            rq_job_id = worker.get_current_job_id()  # <job id>-<attempt>-<random>, or -<attempt>-node<n>
        except KeyError:  # its execution's record half expired (a long Redis outage): no job to name
            rq_job_id = None
        workers.append(
            WorkerInfo(
                name=worker.name,
                queues=[kind_of.get(name, name) for name in worker.queue_names()],
                busy=worker.get_state() == WorkerStatus.BUSY,
                job_id=rq_job_id.split("-")[0] if rq_job_id else None,
                started_at=worker.birth_date,
                last_heartbeat=worker.last_heartbeat,
            )
        )
    queues = []
    for kind in QUEUE_NAMES:
        takers = sum(kind in w.queues for w in workers)
        queues.append(QueueInfo(name=kind, waiting=len(rq_queue(redis, kind)), workers=takers))
    return Workers(workers=workers, queues=queues)
