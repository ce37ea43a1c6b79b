"""
The model server's side of sharing the machine's GPUs with training jobs (jobs.gpu_claims has the
rule). It serves on the last GPU it can see unless INFERENCE_GPUS says otherwise. Before a model loads
it marks that GPU as holding its memory, and a thread renews the mark every POLL_SECONDS. When a job's
mark appears on the GPU, the job has priority: the server refuses new requests (503 gpu_busy), lets
running generations finish for up to DRAIN_SECONDS, ends the rest, unloads its models, gives their
memory back and takes its mark off, which lets the job's program start. Once the job's mark is gone
it serves again; models load on the next request.
"""

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from jobs import gpu_claims
from redis import Redis
from redis.exceptions import RedisError

from inference.metrics import Metrics
from inference.settings import InferenceSettings

log = logging.getLogger("inference")
POLL_SECONDS = 2.0  # how often the server looks for a job on its GPU (and renews its own mark)
DRAIN_SECONDS = 30.0  # running generations get this long to finish before a job takes the GPU
REDIS_TIMEOUT_SECONDS = 5


class GpuBusy(Exception):
    """A training job holds the model server's GPU."""

    def __init__(self, job: str) -> None:
        super().__init__(
            f"The model server's GPU is in use by training job {job}; its models are unloaded until the "
            "job ends. To chat while training, give the model server and the workers different GPUs "
            "(INFERENCE_GPUS, WORKER_GPUS)."
        )
        self.job = job


def serving_devices(inference_gpus: str | None) -> str | None:
    """The CUDA_VISIBLE_DEVICES to serve with: INFERENCE_GPUS, else the last GPU this process can see
    (jobs take theirs from the first); None on a machine without GPUs."""
    if inference_gpus:
        return inference_gpus
    devices = gpu_claims.visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), gpu_claims.machine_gpus())
    return devices[-1] if devices else None


class GpuShare:
    """The model server's mark on its GPU, and the training job it has made way for, if any. Without
    Redis or a GPU it shares nothing: it marks nothing, and no job ever pauses the server."""

    def __init__(self, redis: Redis | None, gpu: str | None, metrics: Metrics) -> None:
        self.redis, self.gpu, self.metrics = redis, gpu, metrics
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.job: str | None = None  # the training job on the GPU: requests are refused while set
        self.held = False  # the server's mark is on the GPU (renewed until it lets go)
        self.lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: InferenceSettings, metrics: Metrics) -> "GpuShare":
        """The GPU models load on (CUDA's first visible one), shared through REDIS_URL."""
        gpu = None
        if settings.inference_device != "cpu":
            gpus = gpu_claims.machine_gpus()
            devices = gpu_claims.visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"), gpus)
            gpu = next(iter(gpu_claims.uuids_of(devices[:1], gpus)), None)
        if gpu is not None and not settings.redis_url:
            log.warning("REDIS_URL is not set: the model server keeps GPU %s even when a job needs it", gpu)
        if gpu is None or not settings.redis_url:
            return cls(None, gpu, metrics)
        log.info("serving on GPU %s; a training job that needs it has priority", gpu)
        timeout = REDIS_TIMEOUT_SECONDS
        redis = Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
        return cls(redis, gpu, metrics)

    @property
    def shared(self) -> bool:
        return self.redis is not None and self.gpu is not None

    def refuse_if_busy(self) -> None:
        if self.job is not None:
            raise GpuBusy(self.job)

    def claim(self) -> None:
        """Before a model loads: mark the GPU as holding the server's memory, unless a job holds it
        (GpuBusy then). The job writes its mark before it looks for the server's, and the server the
        other way round, so at least one of them sees the other."""
        if not self.shared:
            return
        with self.lock:
            try:
                gpu_claims.hold_for_server(self.redis, self.gpu, self.name)
                job = gpu_claims.job_on(self.redis, self.gpu)
            except RedisError as error:  # load all the same; the thread renews the mark once Redis is back
                log.warning("cannot mark GPU %s as the model server's (Redis: %s)", self.gpu, error)
                job = None
            if job is None:
                self.held = True
                return
            if not self.held:
                gpu_claims.release_for_server(self.redis, self.gpu, self.name)
        raise GpuBusy(job)  # the thread makes way at its next round

    def renew(self) -> None:
        with self.lock:
            if self.held:
                gpu_claims.hold_for_server(self.redis, self.gpu, self.name)

    def release(self) -> None:
        with self.lock:
            if self.held:
                self.held = False  # first: should Redis fail now, the mark expires unrenewed
                gpu_claims.release_for_server(self.redis, self.gpu, self.name)

    def watch(self, busy: Callable[[], bool], unload: Callable[[str], None]) -> Callable[[], None]:
        """Every POLL_SECONDS, in a thread: make way for a job that came (`busy` says whether requests
        still run; `unload` ends them and unloads every model), serve again once it has gone, renew the
        mark. Returns what stops the thread (nothing to stop when nothing is shared)."""
        if not self.shared:
            return lambda: None
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(POLL_SECONDS):
                try:
                    self.check(busy, unload)
                except RedisError as error:  # Redis restarting: the server stays as it is meanwhile
                    log.warning("cannot see who holds GPU %s (Redis: %s)", self.gpu, error)

        thread = threading.Thread(target=loop, name="gpu-share", daemon=True)
        thread.start()

        def stop_watching() -> None:
            stop.set()
            thread.join()

        return stop_watching

    def check(self, busy: Callable[[], bool], unload: Callable[[str], None]) -> None:
        job = gpu_claims.job_on(self.redis, self.gpu)
        if job is not None and self.job is None:
            self.make_way(job, busy, unload)
        elif job is None and self.job is not None:
            log.info("training job %s has let go of GPU %s: serving again", self.job, self.gpu)
            self.metrics.paused.set(0)
        self.job = job
        self.renew()

    def make_way(self, job: str, busy: Callable[[], bool], unload: Callable[[str], None]) -> None:
        log.warning("training job %s needs GPU %s: unloading the models until it ends", job, self.gpu)
        self.job = job  # from now on requests are refused
        self.metrics.paused.set(1)
        deadline = time.monotonic() + DRAIN_SECONDS
        while busy() and time.monotonic() < deadline:
            self.renew()  # the job's program waits for these to finish
            time.sleep(0.5)
        unload(f"ended early: training job {job} needs the model server's GPU")
        self.release()
