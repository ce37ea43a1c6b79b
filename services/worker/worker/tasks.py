"""
The RQ task: run one attempt of a job's trainer program as a child process. Running it as a child
(not in the work horse) means its output can be captured line by line, a crash in it never takes the
worker down, and a stop can send it SIGTERM so a trainer gets to save a checkpoint.

While the child runs, the task renews the job's lease (the reaper re-queues a job whose lease
expired: its worker is gone) and the run/stage lock, and watches for a stop request and the time limit.
When the worker itself is told to shut down (SIGTERM from `docker compose stop`, Ctrl-C), the program
gets SIGTERM at once, saves a checkpoint, and the job goes back on the queue for the next worker.
Redis may go away meanwhile: the child runs on, its output is kept in the log file and buffered for
Redis, and the outcome is written once Redis is back.
"""

import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from jobs import gpu_claims, models, queue, records
from jobs.records import Attempt, JobRecord, JobStatus
from jobs.redaction import redact
from jobs.specs import ProgramJob
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import get_current_job

from worker import gpus, nodes
from worker.reaper import LOST, requeue_lost
from worker.settings import WorkerSettings, connect

log = logging.getLogger("worker")
POLL_SECONDS = 1.0  # how often a running job checks for a stop request, its time limit and its lease
METRICS_PREFIX = "@@metrics "  # handed to the program: it prints each metrics record after it
REDIS_BACKLOG_LINES = 1_000_000  # output kept in memory while Redis is unreachable
REDIS_RETRY_SECONDS = 600  # how long the outcome waits for Redis to come back
REDIS_RETRY_PAUSE_SECONDS = 2.0  # output waits this long after a failed send before the next try
PUMP_DRAIN_SECONDS = 30  # after the program exits, how long its output may take to arrive
PR_SET_PDEATHSIG = 1
TORCHRUN_FAILURE = re.compile(r"E\d{4} [\d:.]+ +\d+ torch/distributed/elastic/.*\] failed \(exitcode")
# What the program may see of the worker's environment: its own settings, the ML stack's, the basics.
CHILD_ENV_PREFIXES = (
    "NANOCHAT_",
    "CUDA_",
    "NCCL_",
    "GLOO_",
    "TORCH",
    "OMP_",
    "MKL_",
    "HF_",
    "WANDB_",
    "PYTHON",
    "LC_",
)
CHILD_ENV_NAMES = {
    "PATH", "HOME", "LANG", "TZ", "TMPDIR", "USER", "LOGNAME", "TERM", "LD_LIBRARY_PATH", "VIRTUAL_ENV",
    "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "http_proxy", "https_proxy", "no_proxy", "NVIDIA_VISIBLE_DEVICES", "TRITON_CACHE_DIR", "KERNELS_CACHE",
    "CC", "CXX",  # the compilers torch.compile builds kernels with
}  # fmt: skip
# Settings passed on only when set: as everywhere in .env, empty means "the default" (compose hands the
# worker every documented setting, empty ones included, and NCCL would take "" as an interface name).
EMPTY_MEANS_UNSET = ("NCCL_", "GLOO_")

REDIS_TROUBLE = (RedisConnectionError, RedisTimeoutError, OutOfMemoryError)  # what patiently waits out
SHUTDOWN = "worker shut down"  # an attempt's end reason when its worker was told to stop
T = TypeVar("T")
shutting_down = threading.Event()  # set in the work horse when its worker is told to shut down


def request_shutdown(signum: int, frame: object) -> None:
    """The work horse's SIGTERM handler (the worker forwards its own SIGTERM or SIGINT here)."""
    shutting_down.set()


def run_job(job_id: str) -> str:
    """Entry point RQ calls. The record, not RQ's return value, carries the outcome."""
    rq_job, settings = get_current_job(), WorkerSettings()
    redis = connect(settings)  # not RQ's connection: its socket timeout is minutes long
    record = records.load(redis, job_id)
    if record is None or record.status != JobStatus.QUEUED:
        return "skipped: the job was stopped, deleted or taken by another worker before it started"
    try:
        spec = queue.spec_of(record)
        resume = bool(record.attempts) and spec.resumable
        resumed_from_step = latest_step(stage_dir(settings, spec)) if resume else None
    except Exception as error:  # a record this version cannot run (its config no longer validates): it
        # fails here, once, rather than leave RQ's job failed and ours queued for the reaper to re-queue
        failed = records.transition(
            redis, job_id, {JobStatus.QUEUED}, status=JobStatus.FAILED, ended_at=records.now(),
            error=f"cannot start: {type(error).__name__}: {error}",
        )  # fmt: skip
        if failed is not None:
            queue.stage_ended(redis, failed)
        return "failed before it started"
    attempt = Attempt(
        worker=rq_job.worker_name or "?", started_at=records.now(), resumed_from_step=resumed_from_step
    )
    record = records.transition(
        redis,
        job_id,
        {JobStatus.QUEUED},
        status=JobStatus.STARTED,
        started_at=record.started_at or attempt.started_at,
        attempts=[*record.attempts, attempt],
        stop_requested=False,
    )
    if record is None:
        return "skipped: the job changed state before it started"
    lease = Lease(redis, record, spec, settings.job_lease_seconds)
    outcome: Outcome | None = None
    try:
        if not lease.acquire():
            outcome = Outcome(JobStatus.FAILED, f"refused: job {lease.holder} is writing run {spec.run!r}")
        else:
            if record.pipeline_id:
                queue.settle_pipeline(redis, record.pipeline_id)
            outcome = execute(redis, record, spec, settings, lease, resume)
    except BaseException as error:
        outcome = Outcome(JobStatus.FAILED, f"worker error: {type(error).__name__}: {error}")
        raise
    finally:
        if outcome is not None:  # None: another attempt has the job now
            final = patiently(lambda: finish(redis, job_id, outcome, lease))
            if final is not None:
                patiently(lambda: queue.stage_ended(redis, final))
        patiently(lease.release)
    return outcome.status if outcome else "abandoned: another attempt took the job over"


@dataclass
class Outcome:
    status: JobStatus
    reason: str | None = None
    result: dict | None = None

    def __post_init__(self) -> None:
        # The reason becomes the record's error: it may quote the program's last line or an exception.
        self.reason = self.reason and redact(self.reason)


def finish(redis: Redis, job_id: str, outcome: Outcome, lease: "Lease") -> JobRecord | None:
    """Write the outcome, unless another attempt has the job by now. A job whose worker shut down goes
    back on the queue (not counted against max_retries), one that lost a further node's worker as the
    reaper re-queues it; None then, as the job has not ended."""
    current = records.load(redis, job_id)
    if not lease.still_ours(current):
        return None
    if outcome.status == JobStatus.QUEUED and current.stop_requested:  # asked while it checkpointed
        outcome = Outcome(JobStatus.STOPPED, "stopped on request")
    if outcome.status == JobStatus.QUEUED and outcome.reason.startswith(LOST):
        requeue_lost(redis, current, outcome.reason)
        return None
    if outcome.status == JobStatus.QUEUED:
        queue.enqueue(redis, job_id, {JobStatus.STARTED}, attempts=records.end_attempt(outcome.reason))
        return None
    return records.transition(
        redis,
        job_id,
        {JobStatus.STARTED},
        status=outcome.status,
        ended_at=records.now(),
        error=outcome.reason if outcome.status != JobStatus.FINISHED else None,
        result=outcome.result,
        attempts=records.end_attempt(outcome.reason or outcome.status),
    )


def patiently(action: Callable[[], T]) -> T | None:
    """Run a Redis action, retrying while Redis is unreachable (a restart) or out of memory, with
    backoff, for up to 10 minutes (then None, logged)."""
    try:
        return records.retry_redis(action, REDIS_TROUBLE, REDIS_RETRY_SECONDS, report_redis_trouble)
    except REDIS_TROUBLE:
        log.exception("Redis stayed unreachable or out of memory; giving up on this write")
        return None


def report_redis_trouble(error: Exception, pause: float) -> None:
    if isinstance(error, OutOfMemoryError):  # an outage says so where it is noticed: no line per try
        log.warning(
            "Redis is out of memory (%s): retrying in %.1f s (raise REDIS_MAXMEMORY, or delete old jobs)",
            error,
            pause,
        )


def run_dir(settings: WorkerSettings, spec: ProgramJob) -> Path:
    return settings.base_dir.expanduser() / "runs" / spec.run


def stage_dir(settings: WorkerSettings, spec: ProgramJob) -> Path | None:
    return run_dir(settings, spec) / spec.stage if spec.stage else None


def latest_step(folder: Path | None) -> int | None:
    """The newest complete checkpoint in a stage folder."""
    steps = models.list_steps(folder) if folder is not None else []
    return steps[-1] if steps else None


class Lease:
    """The job's lease (it says: a live worker runs this job), its run/stage lock and, while its program
    runs, its GPUs' marks, renewed together."""

    def __init__(self, redis: Redis, record: JobRecord, spec: ProgramJob, seconds: float) -> None:
        self.redis, self.job_id, self.attempts = redis, record.id, len(record.attempts)
        self.ttl_ms = int(seconds * 1000)
        self.lock = records.lock_key(spec.run, spec.stage) if spec.stage else None
        self.holder: str | None = None
        self.gpus: list[str] = []
        self.renewed = time.monotonic()

    def acquire(self) -> bool:
        self.redis.set(records.lease_key(self.job_id), self.attempts, px=self.ttl_ms)
        if self.lock is None or self.redis.set(self.lock, self.job_id, nx=True, px=self.ttl_ms):
            return True
        self.holder = (self.redis.get(self.lock) or b"?").decode()
        return self.holder == self.job_id  # our own earlier attempt's lock, not expired yet

    def renew(self) -> None:
        if time.monotonic() - self.renewed < self.ttl_ms / 3000:
            return
        with self.redis.pipeline() as pipe:
            pipe.set(records.lease_key(self.job_id), self.attempts, px=self.ttl_ms)
            if self.lock:
                pipe.set(self.lock, self.job_id, px=self.ttl_ms)
            gpu_claims.hold_for_job(pipe, self.gpus, self.job_id, self.ttl_ms / 1000)
            pipe.execute()
        self.renewed = time.monotonic()

    def hold_gpus(self, uuids: list[str]) -> None:
        self.gpus = uuids
        gpu_claims.hold_for_job(self.redis, uuids, self.job_id, self.ttl_ms / 1000)

    def release_gpus(self) -> None:
        """The program has ended: the model server may have the GPUs back."""
        gpu_claims.release_for_job(self.redis, self.gpus, self.job_id)
        self.gpus = []

    def still_ours(self, record: JobRecord | None) -> bool:
        """False once the reaper gave the job to a new attempt (this worker was thought lost)."""
        return nodes.attempt_running(record, self.attempts)

    def release(self) -> None:
        """Give up the lease and the lock, unless a newer attempt holds them."""
        if (self.redis.get(records.lease_key(self.job_id)) or b"").decode() == str(self.attempts):
            self.redis.delete(records.lease_key(self.job_id))
        if self.lock and (self.redis.get(self.lock) or b"").decode() == self.job_id:
            self.redis.delete(self.lock)


def execute(
    redis: Redis, record: JobRecord, spec: ProgramJob, settings: WorkerSettings, lease: Lease, resume: bool
) -> Outcome | None:
    folder = run_dir(settings, spec)
    try:
        job_gpus = gpus.for_job(settings, spec.nproc_per_node)
    except gpus.NotEnoughGpus as error:
        return Outcome(JobStatus.FAILED, str(error))
    rendezvous = nodes.host(settings, record) if spec.nnodes > 1 else None
    command = [sys.executable, "-u", *spec.command(resume, rendezvous)]
    attempt = len(record.attempts)
    time_limit, started = record.config.get("time_limit"), time.monotonic()

    def recruit() -> None:  # the further nodes, once this one's torchrun hosts the rendezvous
        if rendezvous is not None:
            patiently(lambda: nodes.recruit(redis, record, spec.nnodes, rendezvous, resume))

    missing_since: dict[int, float] = {}

    def stopped_elsewhere(patience: float) -> str | None:
        """Why the further nodes' programs stopped (or must): one's worker shut down, or one's heartbeat
        has been missing for `patience` seconds (a Redis outage also lets heartbeats expire)."""
        if rendezvous is None:
            return None
        shut_down, missing = nodes.shut_down_or_lost(redis, record.id, attempt)
        if shut_down:
            return SHUTDOWN
        for node in set(missing_since) - set(missing):
            del missing_since[node]
        now = time.monotonic()
        lost = [node for node in missing if now - missing_since.setdefault(node, now) >= patience]
        return f"{LOST}: no heartbeat from node {lost[0]}" if lost else None

    def reason_to_stop() -> str | None:
        if time_limit and time.monotonic() - started > time_limit:
            return f"time limit of {time_limit} s reached"
        current = records.load(redis, record.id)
        if not lease.still_ours(current):
            return "taken over"
        if current.stop_requested:
            return "stopped on request"
        if shutting_down.is_set():
            return SHUTDOWN
        lease.renew()
        return stopped_elsewhere(patience=settings.job_lease_seconds)

    patiently(lambda: lease.hold_gpus(job_gpus.uuids))
    returncode = None  # stays None when the job is stopped while it waits for its GPUs
    try:
        with JobLog(redis, record.id, folder / "logs" / f"{record.id}.log") as job_log:
            why_stopped = gpus.wait_for_model_server(redis, job_gpus, job_log.write, reason_to_stop)
            if why_stopped is None:
                returncode, why_stopped = run_program(
                    command, settings, job_gpus.devices, job_log, reason_to_stop, lease.renew, recruit
                )
    finally:
        patiently(lease.release_gpus)
    if rendezvous:
        grace = settings.cancel_grace_seconds + settings.job_lease_seconds
        patiently(
            lambda: nodes.wait_for_further_nodes(redis, record.id, attempt, spec.nnodes, grace, lease.renew)
        )
    if why_stopped is None and returncode != 0:  # every node stopped together: did one's worker go?
        why_stopped = patiently(lambda: stopped_elsewhere(patience=0))  # the wait let heartbeats expire
    if why_stopped == "taken over":
        return None
    if why_stopped == SHUTDOWN or (why_stopped or "").startswith(LOST):
        return Outcome(JobStatus.QUEUED, why_stopped)
    if why_stopped:  # a trainer stopped by SIGTERM saves a checkpoint and exits with 143
        return Outcome(JobStatus.STOPPED, why_stopped)
    if job_log.lost:
        return Outcome(
            JobStatus.FAILED,
            f"its output could not be kept ({job_log.lost}); the program exited with {returncode}",
        )
    if returncode == 0:
        return Outcome(
            JobStatus.FINISHED, result=read_result(folder / "report" / f"{spec.report_section}.json")
        )
    last_line = job_log.last_line or "(no output)"
    return Outcome(JobStatus.FAILED, f"{spec.program} exited with code {returncode}: {last_line}")


def join_job(job_id: str, attempt: int, node: int, endpoint: str, resume: bool) -> str:
    """Entry point RQ calls for a further node of a multi-node job: run the same program against the
    first node's rendezvous for as long as the attempt it joined runs."""
    settings = WorkerSettings()
    redis = connect(settings)
    record = records.load(redis, job_id)
    if not nodes.attempt_running(record, attempt):
        return f"skipped: attempt {attempt} of job {job_id} is no longer running"
    spec = queue.spec_of(record)
    rendezvous = nodes.join(settings, job_id, attempt, endpoint)
    command = [sys.executable, "-u", *spec.command(resume, rendezvous)]
    log_path = run_dir(settings, spec) / "logs" / f"{job_id}.node{node}.log"
    try:
        job_gpus = gpus.for_job(settings, spec.nproc_per_node)
    except gpus.NotEnoughGpus as error:  # the job's log says why the first node waits for this one in vain
        with JobLog(redis, job_id, log_path, prefix=f"[node {node}] ") as job_log:
            job_log.write(f"not started: {error}")
        return f"node {node} not started: {error}"

    def heartbeat() -> None:
        nodes.heartbeat(redis, job_id, attempt, node, settings.job_lease_seconds)
        gpu_claims.hold_for_job(redis, job_gpus.uuids, job_id, settings.job_lease_seconds)

    def reason_to_stop() -> str | None:
        if shutting_down.is_set():
            nodes.mark(redis, job_id, attempt, node, nodes.SHUT_DOWN)  # before the program stops
            return SHUTDOWN
        heartbeat()
        current = records.load(redis, job_id)
        if not nodes.attempt_running(current, attempt):
            return "the attempt it joined has ended"
        return "stopped on request" if current.stop_requested else None

    heartbeat()
    nodes.mark(redis, job_id, attempt, node, nodes.JOINED)
    why_stopped = returncode = None
    try:
        with JobLog(redis, job_id, log_path, prefix=f"[node {node}] ") as job_log:
            why_stopped = gpus.wait_for_model_server(redis, job_gpus, job_log.write, reason_to_stop)
            if why_stopped is None:
                returncode, why_stopped = run_program(
                    command, settings, job_gpus.devices, job_log, reason_to_stop, heartbeat
                )
    finally:
        patiently(lambda: gpu_claims.release_for_job(redis, job_gpus.uuids, job_id))
        # What became of it (a shutdown's mark again, in case Redis was away): not lost, no retry used.
        state = nodes.SHUT_DOWN if why_stopped == SHUTDOWN else nodes.ENDED
        patiently(lambda: nodes.mark(redis, job_id, attempt, node, state))
        patiently(lambda: redis.delete(nodes.node_key(job_id, attempt, node)))
    return f"node {node} exited with {returncode}" + (f" ({why_stopped})" if why_stopped else "")


def run_program(
    command: list[str],
    settings: WorkerSettings,
    devices: str | None,
    job_log: "JobLog",
    reason_to_stop: Callable[[], str | None],
    keep_alive: Callable[[], None],
    on_start: Callable[[], None] = lambda: None,
) -> tuple[int, str | None]:
    """Run a job's program on the GPUs `devices` (see child_environment), its output copied into the
    job's log, until it ends or `reason_to_stop` (asked every POLL_SECONDS; Redis may be down
    meanwhile) names a reason to stop it; `keep_alive` (the lease, a heartbeat) is renewed while a
    stopped program saves its checkpoint. Returns its exit code and that reason (None when it ended by
    itself)."""
    job_log.write(f"$ python {' '.join(command[2:])}")
    child = subprocess.Popen(
        command,
        cwd=settings.base_dir.expanduser(),  # paths in a job's config (a mixture file) are relative to it
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=child_environment(settings, devices),
        start_new_session=True,  # its own process group: a stop reaches torchrun's children too
        preexec_fn=die_with_parent,
    )
    pump = threading.Thread(target=job_log.copy_from, args=(child.stdout,), daemon=True)
    pump.start()
    try:
        on_start()
        why_stopped = supervise(child, settings, job_log, reason_to_stop, keep_alive)
    finally:  # also when the worker fails: nothing of the program outlives its supervision
        with contextlib.suppress(ProcessLookupError):  # what it left running (it holds the pipe)
            os.killpg(child.pid, signal.SIGKILL)
        pump.join(PUMP_DRAIN_SECONDS)
        job_log.flush_backlog(final=True)
    return child.returncode, why_stopped


def supervise(
    child: subprocess.Popen,
    settings: WorkerSettings,
    job_log: "JobLog",
    reason_to_stop: Callable[[], str | None],
    keep_alive: Callable[[], None],
) -> str | None:
    """Wait for the child; stop it (SIGTERM, then SIGKILL after the grace) once there is a reason.
    Returns that reason, or None when it ended by itself."""
    while True:
        try:
            child.wait(timeout=POLL_SECONDS)
            return None
        except subprocess.TimeoutExpired:
            pass
        try:
            reason = reason_to_stop()
            job_log.flush_backlog()
        except RedisError as error:  # Redis is down or restarting: the program runs on
            log.warning("job %s: Redis unreachable (%s); the program runs on", job_log.job_id, error)
            reason = SHUTDOWN if shutting_down.is_set() else None
        if reason:
            break
    job_log.write(f"stopping the program (SIGTERM): {reason}")
    os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + settings.cancel_grace_seconds
    while child.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(RedisError):
            keep_alive()  # a slow checkpoint must not look like a lost worker
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=POLL_SECONDS)
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    return reason


def child_environment(settings: WorkerSettings, devices: str | None) -> dict[str, str]:
    """An allow-listed environment: the worker's secrets (API_TOKEN, REDIS_URL's password) stay out.
    `devices` (the job's GPUs, gpus.for_job) become its CUDA_VISIBLE_DEVICES; None leaves the worker's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if (k in CHILD_ENV_NAMES or k.startswith(CHILD_ENV_PREFIXES))
        and (v or not k.startswith(EMPTY_MEANS_UNSET))
    }
    env |= {
        "PYTHONUNBUFFERED": "1",
        # Its cwd is the base dir, which other services write: not on sys.path (python -P, for torchrun's
        # children too), so a `trainer/` folder there cannot stand in for the trainer.
        "PYTHONSAFEPATH": "1",
        "NANOCHAT_BASE_DIR": str(settings.base_dir.expanduser()),
        "NANOCHAT_METRICS_PREFIX": METRICS_PREFIX,
        "CUDA_DEVICE_ORDER": gpu_claims.PCI_BUS_ID,  # CUDA's GPU ids are then nvidia-smi's, as `devices` are
    }
    if settings.data_dir is not None:
        env["NANOCHAT_DATA_DIR"] = str(settings.data_dir.expanduser())
    if devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = devices
    return env


def die_with_parent() -> None:
    """In the child, before exec: if the work horse dies (SIGKILL), the kernel sends us SIGTERM."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class JobLog:
    """A job's output: appended to its log file and its Redis stream (metrics records to the metrics
    stream and the record's progress). It never stops reading the pipe: while Redis is unreachable
    lines wait in memory, and a file that cannot be written (full disk) marks the output as lost.
    `prefix` starts every line (a further node's output is told apart from the first node's)."""

    def __init__(self, redis: Redis, job_id: str, path: Path, prefix: str = "") -> None:
        self.redis, self.job_id, self.path, self.prefix = redis, job_id, path, prefix
        self.last_line = ""
        self.launcher_failed = False
        self.lost: str | None = None
        self.backlog: deque[tuple[str, Any]] = deque()
        self.progress_start: tuple[float, float] | None = None  # (time, progress) at this attempt's start
        self.next_try = 0.0  # after a failed send, the backlog waits this long (monotonic) for Redis
        self.lock = threading.Lock()

    def __enter__(self) -> "JobLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.file.close()
        except OSError as error:
            self.lost = self.lost or str(error)

    def copy_from(self, stream: IO[bytes]) -> None:
        for line in split_lines(stream):
            try:
                if line.startswith(METRICS_PREFIX):
                    self.metrics(line.removeprefix(METRICS_PREFIX))
                else:
                    self.write(line)
            except Exception as error:  # whatever went wrong, the pipe is still read to its end
                log.exception("job %s: output line not kept", self.job_id)
                self.lost = self.lost or f"an output line could not be kept: {error}"

    def write(self, line: str) -> None:
        # torchrun's report of a failed program (a log line, then its traceback and summary) follows the
        # program's own last words, which say why: those stay the last line.
        self.launcher_failed = self.launcher_failed or bool(TORCHRUN_FAILURE.match(line))
        line = redact(self.prefix + line)  # a program may print a secret it was given (a mirror's URL)
        with self.lock:
            try:
                self.file.write(line + "\n")
                self.file.flush()
            except OSError as error:
                self.lost = self.lost or f"cannot write {self.path}: {error}"
            if line.strip() and not self.launcher_failed:
                self.last_line = line
            self.send("log", line)

    def metrics(self, text: str) -> None:
        try:
            values = json.loads(text)
        except ValueError:
            values = None
        if not isinstance(values, dict):  # not a metrics record after all: an ordinary line
            return self.write(METRICS_PREFIX + text)
        with self.lock:
            self.send("metrics", values)

    def send(self, kind: str, payload: Any) -> None:
        self.backlog.append((kind, payload))
        if len(self.backlog) > REDIS_BACKLOG_LINES:
            self.backlog.popleft()
            self.lost = self.lost or "Redis was unreachable for longer than the output buffer lasts"
        if time.monotonic() >= self.next_try:
            self.try_flush()

    def flush_backlog(self, final: bool = False) -> None:
        with self.lock:
            patiently(self.flush) if final else self.try_flush()

    def try_flush(self) -> None:
        try:
            self.flush()
        except RedisError:  # what did not go stays in the backlog; Redis gets a moment
            self.next_try = time.monotonic() + REDIS_RETRY_PAUSE_SECONDS

    def flush(self) -> None:
        """Send what waits, oldest first (what fails to go stays in the backlog)."""
        if not self.backlog:
            return
        latest = None
        with self.redis.pipeline(transaction=False) as pipe:
            for kind, payload in self.backlog:
                if kind == "log":
                    records.append_log(pipe, self.job_id, payload)
                else:
                    records.append_metrics(pipe, self.job_id, payload)
                    latest = payload
            pipe.execute()
        self.backlog.clear()
        if latest is not None:
            self.record_progress(latest)

    def record_progress(self, values: dict[str, Any]) -> None:
        """The record's progress: the latest metrics, percent done and an ETA from this attempt's pace."""
        progress = dict(values)
        fraction = values.get("progress")
        if isinstance(fraction, (int, float)):
            now = time.monotonic()
            if self.progress_start is None:
                self.progress_start = (now, fraction)
            start_time, start_fraction = self.progress_start
            progress["percent"] = round(100 * fraction, 2)
            if fraction > start_fraction:
                rate = (fraction - start_fraction) / (now - start_time)
                progress["eta_seconds"] = round((1 - fraction) / rate, 1)
        merged = lambda record: {**record.progress, **progress}  # noqa: E731 (val_bpb stays between evals)
        records.transition(self.redis, self.job_id, {JobStatus.STARTED}, progress=merged)


def split_lines(stream: IO[bytes]) -> Iterator[str]:
    r"""Lines of a byte stream as soon as they end: at \n, or at \r (a progress bar redraws itself
    after a \r without ever printing \n). Blank lines are kept; the empty pieces around a \r are not."""
    pending = b""
    while chunk := stream.read1(65536):
        pending += chunk
        # Hold back a trailing \r: it may be the first half of a \r\n split across two reads.
        held = b"\r" if pending.endswith(b"\r") else b""
        *lines, last = pending[: len(pending) - len(held)].replace(b"\r\n", b"\n").split(b"\n")
        for line in lines:
            yield from redraws(line)
        redrawn, _, pending = last.rpartition(b"\r")
        yield from (text for text in redraws(redrawn) if text)
        pending += held
    if pending.strip(b"\r"):
        yield from redraws(pending)


def redraws(line: bytes) -> list[str]:
    pieces = [piece for piece in line.split(b"\r") if piece] or [b""]
    return [piece.decode("utf-8", errors="replace") for piece in pieces]


def read_result(path: Path) -> dict | None:
    """The program's report section, if it wrote one."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
