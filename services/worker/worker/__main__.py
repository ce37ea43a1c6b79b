"""`python -m worker`: an RQ worker on the job queues of WORKER_QUEUES (one job at a time; run several
for more), plus the reaper that re-queues jobs whose worker died."""

import logging
import os
import signal
import sys
import uuid

from jobs.queue import QUEUE_NAMES, SERIALIZER, rq_queue
from jobs.redaction import hide_secrets, redact, settings_error
from pydantic import ValidationError
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Worker

from worker import gpus
from worker.health import host_prefix
from worker.reaper import start_reaper
from worker.settings import WorkerSettings, connect
from worker.tasks import request_shutdown


class CheckpointingWorker(Worker):
    """RQ's worker, except that a shutdown (SIGTERM, Ctrl-C) reaches the running job at once: its program
    checkpoints and the job is re-queued. RQ's own warm shutdown would let it train on until a container
    stop's SIGKILL, losing the work since the last periodic checkpoint. A second signal still kills."""

    def setup_work_horse_signals(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the worker, not here
        signal.signal(signal.SIGTERM, request_shutdown)

    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()
        if self.horse_pid:
            self.kill_horse(signal.SIGTERM)


def main() -> None:
    try:
        settings = WorkerSettings()
    except ValidationError as error:
        sys.exit(f"worker: invalid settings: {settings_error(error)}")
    hide_secrets(settings.redis_url)  # its jobs' output and errors, too (the work horse is a fork)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    redis = connect(settings)
    try:
        redis.ping()
    except RedisConnectionError as error:
        sys.exit(f"worker: cannot reach Redis at {redact(settings.redis_url)}: {error}")
    # A fresh name each start: a container restarted after a SIGKILL would otherwise find its old
    # registration (same host, same pid 1) and refuse to start.
    name = f"{host_prefix()}{uuid.uuid4().hex[:12]}"
    # RQ's own client, unused until RQ sets its socket timeout: its dequeue blocks for minutes.
    rq_redis = Redis.from_url(settings.redis_url)
    queues = [rq_queue(rq_redis, kind) for kind in settings.queue_kinds]
    worker = CheckpointingWorker(queues, connection=rq_redis, name=name, serializer=SERIALIZER)
    gpu_set = None
    # One set of several: take a free one. A worker of CPU jobs alone needs none.
    if settings.gpus and ";" in settings.gpus and "gpu" in settings.queue_kinds:
        gpu_set = gpus.claim(redis, settings.machine, settings.gpus, name, settings.job_lease_seconds)
        stop_renewing = gpus.keep(redis, settings.machine, gpu_set, name, settings.job_lease_seconds)
        os.environ["WORKER_GPUS"] = gpu_set  # what each job's settings read (they load in the work horse)
    start_reaper(redis, settings.job_lease_seconds, settings.job_retention_days)
    logging.info(
        "%s listening on %s (runs in %s%s)", name, " and ".join(QUEUE_NAMES[k] for k in settings.queue_kinds),
        settings.base_dir,
        f", GPUs {gpu_set}" if gpu_set else "",
    )  # fmt: skip
    try:
        worker.work()
    finally:
        if gpu_set:
            stop_renewing()  # first: a renewal after the release would claim the set again
            gpus.release(redis, settings.machine, gpu_set, name)


if __name__ == "__main__":
    main()
