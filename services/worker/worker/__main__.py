"""`python -m worker`: an RQ worker on the jobs queue (one job at a time; run several for more)."""

import logging
import os
import sys

from pydantic import ValidationError
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from rq import Queue, Worker

from worker.health import host_prefix
from worker.queue import QUEUE_NAME
from worker.settings import WorkerSettings


def main() -> None:
    try:
        settings = WorkerSettings()
    except ValidationError as error:
        sys.exit(f"worker: invalid settings:\n{error}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    redis = Redis.from_url(settings.redis_url)
    try:
        redis.ping()
    except RedisConnectionError as error:
        sys.exit(f"worker: cannot reach Redis at {settings.redis_url}: {error}")
    worker = Worker(
        [Queue(QUEUE_NAME, connection=redis)], connection=redis, name=f"{host_prefix()}{os.getpid()}"
    )
    logging.info(
        "listening on queue %r at %s (runs in %s)", QUEUE_NAME, settings.redis_url, settings.base_dir
    )
    worker.work()


if __name__ == "__main__":
    main()
