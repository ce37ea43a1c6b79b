"""
One GPU set per worker when several workers start from one configuration (`docker compose up --scale
worker=N`, or N local processes): WORKER_GPUS lists the sets, `0,1,2,3;4,5,6,7`, and each worker claims
the first one that no live worker of the same machine (WORKER_MACHINE) holds. A claim is a Redis key
that expires unless its worker renews it, so a set held by a worker that died frees itself.
"""

import logging
import threading
from collections.abc import Callable

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger("worker")


def claim_key(machine: str, gpu_set: str) -> str:
    return f"nanochat:gpus:{machine}:{gpu_set}"


def claim(redis: Redis, machine: str, sets: str, worker: str, seconds: float) -> str:
    """The first free set of `sets` (`;`-separated), now held by `worker`; SystemExit when none is free."""
    choices = sets.split(";")
    for gpu_set in choices:
        if redis.set(claim_key(machine, gpu_set), worker, nx=True, px=int(seconds * 1000)):
            return gpu_set
    holders = [(redis.get(claim_key(machine, s)) or b"?").decode() for s in choices]
    taken = ", ".join(f"{s} by {holder}" for s, holder in zip(choices, holders, strict=True))
    raise SystemExit(
        f"worker: every GPU set in WORKER_GPUS is held on machine {machine!r} ({taken}); "
        "start no more workers than sets, or give workers on another machine their own WORKER_MACHINE"
    )


def keep(redis: Redis, machine: str, gpu_set: str, worker: str, seconds: float) -> Callable[[], None]:
    """Renew the claim every third of its lifetime, in a thread; returns what stops the renewals (call
    it before `release`, or a renewal could claim the set again)."""
    stop = threading.Event()

    def loop() -> None:
        key, lifetime_ms = claim_key(machine, gpu_set), int(seconds * 1000)
        while not stop.wait(seconds / 3):
            try:
                holder = redis.get(key)
                if holder == worker.encode():
                    redis.pexpire(key, lifetime_ms)
                elif holder is not None or not redis.set(key, worker, nx=True, px=lifetime_ms):
                    log.error("GPU set %s is now held by %s as well", gpu_set, (holder or b"?").decode())
            except RedisError as error:
                log.warning("GPU set %s: cannot renew the claim: %s", gpu_set, error)

    thread = threading.Thread(target=loop, name="gpu-claim", daemon=True)
    thread.start()

    def stop_renewing() -> None:
        stop.set()
        thread.join()

    return stop_renewing


def release(redis: Redis, machine: str, gpu_set: str, worker: str) -> None:
    """Give the set back, unless another worker holds it by now."""
    key = claim_key(machine, gpu_set)
    if redis.get(key) == worker.encode():
        redis.delete(key)
