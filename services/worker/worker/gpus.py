"""
The GPUs of a worker and of its jobs.

One GPU set per worker when several workers start from one configuration (`docker compose up --scale
worker=N`, or N local processes): WORKER_GPUS lists the sets, `0,1,2,3;4,5,6,7`, and each worker claims
the first one that no live worker of the same machine (WORKER_MACHINE) holds. A claim is a Redis key
that expires unless its worker renews it, so a set held by a worker that died frees itself.

A job's program runs on the first nproc_per_node GPUs of its worker's (WORKER_GPUS, else every GPU),
marked as the job's in Redis while it runs (jobs.gpu_claims). The model server serves on the last GPU,
so the two meet only when a job needs that one too; then the program starts once the model server has
unloaded its models there.
"""

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from jobs import gpu_claims
from redis import Redis
from redis.exceptions import RedisError

from worker.settings import WorkerSettings

log = logging.getLogger("worker")
SERVER_WAIT_SECONDS = 120.0  # how long a job waits for the model server to let go of its GPUs
SERVER_POLL_SECONDS = 0.5


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


class NotEnoughGpus(Exception):
    """The job asks for more processes than its worker has GPUs."""


@dataclass
class JobGpus:
    devices: str | None  # the program's CUDA_VISIBLE_DEVICES; None: the worker's own (no GPU here)
    uuids: list[str]  # what the job holds in Redis while its program runs


def for_job(settings: WorkerSettings, processes: int) -> JobGpus:
    """The GPUs a job of `processes` processes runs on: the first of its worker's. On a machine
    without GPUs its processes share the CPU, as many as they are."""
    gpus = gpu_claims.machine_gpus()
    mine = gpu_claims.visible_devices(settings.gpus or os.environ.get("CUDA_VISIBLE_DEVICES"), gpus)
    if not gpu_claims.uuids_of(mine, gpus):
        return JobGpus(settings.gpus, [])
    if processes > len(mine):
        raise NotEnoughGpus(
            f"nproc_per_node is {processes} but this worker has {len(mine)} GPU(s) ({','.join(mine)}): "
            "lower nproc_per_node or give the worker more GPUs (WORKER_GPUS)"
        )
    chosen = mine[:processes]
    return JobGpus(",".join(chosen), gpu_claims.uuids_of(chosen, gpus))


def wait_for_model_server(
    redis: Redis, job_gpus: JobGpus, say: Callable[[str], None], reason_to_stop: Callable[[], str | None]
) -> str | None:
    """Until the model server has let go of the job's GPUs (it unloads its models once it sees the
    job's mark), for SERVER_WAIT_SECONDS at most: a server that never answers does not hold the job
    back. `say` writes to the job's log; `reason_to_stop` (it renews the lease) is asked meanwhile,
    and the reason it gives, if any, is returned: the program is then not started."""
    started = time.monotonic()
    try:
        if not gpu_claims.held_by_server(redis, job_gpus.uuids):
            return None
        say(
            f"waiting for the model server to unload its models from the job's GPUs ({job_gpus.devices}): "
            "a job has priority (give the model server a GPU of its own with WORKER_GPUS / INFERENCE_GPUS "
            "to chat while training)"
        )
        while gpu_claims.held_by_server(redis, job_gpus.uuids):
            if time.monotonic() - started > SERVER_WAIT_SECONDS:
                say(f"the model server still holds the GPU after {SERVER_WAIT_SECONDS:.0f} s: starting")
                return None
            if reason := reason_to_stop():
                return reason
            time.sleep(SERVER_POLL_SECONDS)
    except RedisError as error:
        say(f"cannot see whether the model server holds the GPU (Redis: {error}): starting anyway")
        return None
    say(f"the model server let go of the GPU after {time.monotonic() - started:.0f} s")
    return None
