"""`python -m worker.health`: exit 0 when a worker of this host is registered with RQ (a healthcheck)."""

import socket
import sys

from redis import Redis
from redis.exceptions import RedisError
from rq import Worker

from worker.settings import WorkerSettings


def host_prefix() -> str:
    """Worker names are "<prefix><random>", so a host's workers can be found by name."""
    return f"nanochat-{socket.gethostname()}-"


def main() -> None:
    redis = Redis.from_url(WorkerSettings().redis_url, socket_timeout=3)
    try:
        names = [worker.name for worker in Worker.all(connection=redis)]
    except RedisError as error:
        sys.exit(f"unhealthy: Redis unreachable: {error}")
    if not any(name.startswith(host_prefix()) for name in names):
        sys.exit(f"unhealthy: no worker of host {socket.gethostname()} is registered")


if __name__ == "__main__":
    main()
