"""
Who holds which GPU of a machine: a training job's program or the model server. The rule: jobs take
their worker's GPUs from the first, the model server serves on the last GPU it can see (unless
INFERENCE_GPUS says otherwise), so by default they never meet. When a job needs the model server's
GPU all the same (it uses every GPU, the machine has one, or WORKER_GPUS and INFERENCE_GPUS overlap),
the job has priority: the model server refuses requests, unloads its models and lets go of the GPU,
and the job's program starts once it has. Both sides say what they hold in Redis:

    nanochat:gpu:<uuid>:job      the id of the job whose program runs there (renewed with its lease)
    nanochat:gpu:<uuid>:server   the model server has memory there (renewed every few seconds)

A GPU is named by its UUID, the same in every process and container of the machine. The ids in
WORKER_GPUS, INFERENCE_GPUS and CUDA_VISIBLE_DEVICES are nvidia-smi's indices: the services run their
models with CUDA_DEVICE_ORDER=PCI_BUS_ID, so CUDA numbers the GPUs the same way. A machine without
nvidia-smi has no GPUs to share, and nothing here changes anything there. No torch here: the API
imports this package without the ML stack.
"""

import subprocess

from redis import Redis
from redis.client import Pipeline

PCI_BUS_ID = "PCI_BUS_ID"  # CUDA_DEVICE_ORDER under which CUDA's GPU ids are nvidia-smi's
SERVER_HOLD_SECONDS = 10  # a model server that died lets go of its GPU this long after its last renewal


def machine_gpus() -> dict[str, str]:
    """This machine's GPUs, index → UUID, in nvidia-smi's order; {} without nvidia-smi (or a GPU)."""
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    pairs = [line.split(",") for line in listing.splitlines() if line.count(",") == 1]
    return {index.strip(): uuid.strip() for index, uuid in pairs}


def visible_devices(listed: str | None, gpus: dict[str, str]) -> list[str]:
    """The GPU ids a process may use: those `listed` (a CUDA_VISIBLE_DEVICES value), else every GPU."""
    if listed is None:
        return list(gpus)
    return [device.strip() for device in listed.split(",") if device.strip()]


def uuids_of(devices: list[str], gpus: dict[str, str]) -> list[str]:
    """The UUIDs of these GPU ids (a UUID stands for itself); ids this machine lacks are left out."""
    known = set(gpus.values())
    return [gpus.get(device, device) for device in devices if device in gpus or device in known]


def job_key(uuid: str) -> str:
    return f"nanochat:gpu:{uuid}:job"


def server_key(uuid: str) -> str:
    return f"nanochat:gpu:{uuid}:server"


def hold_for_job(redis: Redis | Pipeline, uuids: list[str], job_id: str, seconds: float) -> None:
    """Mark these GPUs as the job's for `seconds` (its worker renews the mark with the job's lease)."""
    for uuid in uuids:
        redis.set(job_key(uuid), job_id, px=int(seconds * 1000))


def release_for_job(redis: Redis, uuids: list[str], job_id: str) -> None:
    """Take the job's marks off these GPUs, except where another job holds one by now."""
    for uuid in uuids:
        if redis.get(job_key(uuid)) == job_id.encode():
            redis.delete(job_key(uuid))


def job_on(redis: Redis, uuid: str) -> str | None:
    """The job whose program runs on this GPU, if any."""
    job_id = redis.get(job_key(uuid))
    return job_id.decode() if job_id is not None else None


def held_by_server(redis: Redis, uuids: list[str]) -> list[str]:
    """Those of these GPUs the model server has memory on."""
    with redis.pipeline(transaction=False) as pipe:
        for uuid in uuids:
            pipe.exists(server_key(uuid))
        held = pipe.execute()
    return [uuid for uuid, exists in zip(uuids, held, strict=True) if exists]


def hold_for_server(redis: Redis, uuid: str, server: str) -> None:
    redis.set(server_key(uuid), server, px=SERVER_HOLD_SECONDS * 1000)


def release_for_server(redis: Redis, uuid: str, server: str) -> None:
    """The model server has given its memory on this GPU back (unless another server holds it now)."""
    if redis.get(server_key(uuid)) == server.encode():
        redis.delete(server_key(uuid))
