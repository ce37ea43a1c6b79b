"""`python -m worker`: an RQ worker on the jobs queue (one job at a time; run several for more),
plus the reaper that re-queues jobs whose worker died."""

import logging
import sys
import uuid

from jobs.queue import QUEUE_NAME, SERIALIZER, rq_queue
from pydantic import ValidationError
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Worker

from worker.health import host_prefix
from worker.reaper import start_reaper
from worker.settings import WorkerSettings, connect


def main() -> None:
    try:
        settings = WorkerSettings()
    except ValidationError as error:
        sys.exit(f"worker: invalid settings:\n{error}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    redis = connect(settings)
    try:
        redis.ping()
    except RedisConnectionError as error:
        sys.exit(f"worker: cannot reach Redis at {settings.redis_url}: {error}")
    # A fresh name each start: a container restarted after a SIGKILL would otherwise find its old
    # registration (same host, same pid 1) and refuse to start.
    name = f"{host_prefix()}{uuid.uuid4().hex[:12]}"
    # RQ's own client, unused until RQ sets its socket timeout: its dequeue blocks for minutes.
    rq_redis = Redis.from_url(settings.redis_url)
    worker = Worker([rq_queue(rq_redis)], connection=rq_redis, name=name, serializer=SERIALIZER)
    start_reaper(redis, settings.job_lease_seconds, settings.job_retention_days)
    logging.info("%s listening on queue %r (runs in %s)", name, QUEUE_NAME, settings.base_dir)
    worker.work()


if __name__ == "__main__":
    main()
