"""`python -m worker.health`: exit 0 when a live worker of this host is registered with RQ (a healthcheck)."""

import os
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
        workers = Worker.all(connection=redis)
    except RedisError as error:
        sys.exit(f"unhealthy: Redis unreachable: {error}")
    if not any(w.name.startswith(host_prefix()) and w.pid and is_running(w.pid) for w in workers):
        sys.exit(f"unhealthy: no live worker of host {socket.gethostname()} is registered")


def is_running(pid: int) -> bool:
    """A registration a SIGKILLed worker left behind names a process that is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


if __name__ == "__main__":
    main()
