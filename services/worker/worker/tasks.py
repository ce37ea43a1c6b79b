"""
The RQ task: run a job's trainer program as a child process. Running it as a child (not in the work
horse) means its output can be captured line by line, a crash in it never takes the worker down, and
a cancel can send it SIGTERM so a trainer gets to save a checkpoint.
"""

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from redis import Redis
from rq import get_current_job

from worker import records
from worker.records import JobRecord, JobStatus
from worker.settings import WorkerSettings
from worker.specs import JOB_SPEC, JobSpec

POLL_SECONDS = 1.0  # how often a running job checks for a cancel request
PR_SET_PDEATHSIG = 1


def run_job(job_id: str) -> str:
    """Entry point RQ calls. The record, not RQ's return value, carries the outcome."""
    redis = get_current_job().connection
    record = records.transition(
        redis, job_id, {JobStatus.QUEUED}, status=JobStatus.STARTED, started_at=records.now()
    )
    if record is None:
        return "skipped: the job was canceled (or is unknown) before it started"
    try:
        final = execute(redis, record, WorkerSettings())
    except BaseException as error:
        records.transition(
            redis,
            job_id,
            {JobStatus.STARTED},
            status=JobStatus.FAILED,
            ended_at=records.now(),
            error=f"worker error: {type(error).__name__}: {error}",
        )
        raise
    return final.status


def execute(redis: Redis, record: JobRecord, settings: WorkerSettings) -> JobRecord:
    spec: JobSpec = JOB_SPEC.validate_python(
        {"kind": record.kind, "run": record.run, "config": record.config}
    )
    run_dir = settings.base_dir.expanduser() / "runs" / spec.run
    log_path = run_dir / "logs" / f"{record.id}.log"

    command = [sys.executable, "-u", *spec.command()]
    with JobLog(redis, record.id, log_path) as log:
        log.write(f"$ python {' '.join(command[2:])}")
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_environment(settings),
            start_new_session=True,  # its own process group: a cancel reaches torchrun's children too
            preexec_fn=die_with_parent,
        )
        pump = threading.Thread(target=log.copy_from, args=(child.stdout,), daemon=True)
        pump.start()
        canceled = wait_or_cancel(redis, record.id, child, settings.cancel_grace_seconds, log)
        pump.join()

    ended = records.now()
    if canceled:  # a trainer stopped by SIGTERM saves a checkpoint and exits with 143
        return finish(redis, record.id, status=JobStatus.CANCELED, ended_at=ended)
    if child.returncode == 0:
        result = read_result(run_dir / "report" / f"{spec.report_section}.json")
        return finish(redis, record.id, status=JobStatus.FINISHED, ended_at=ended, result=result)
    last_line = log.last_line or "(no output)"
    error = f"{spec.program} exited with code {child.returncode}: {last_line}"
    return finish(redis, record.id, status=JobStatus.FAILED, ended_at=ended, error=error)


def finish(redis: Redis, job_id: str, **changes) -> JobRecord:
    record = records.transition(redis, job_id, {JobStatus.STARTED}, **changes)
    assert record is not None, f"job {job_id} left 'started' while its worker was running it"
    return record


def child_environment(settings: WorkerSettings) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NANOCHAT_BASE_DIR": str(settings.base_dir.expanduser())}
    if settings.data_dir is not None:
        env["NANOCHAT_DATA_DIR"] = str(settings.data_dir.expanduser())
    return env


def die_with_parent() -> None:
    """In the child, before exec: if the work horse dies (SIGKILL), the kernel sends us SIGTERM."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_or_cancel(
    redis: Redis, job_id: str, child: subprocess.Popen, grace_seconds: float, log: "JobLog"
) -> bool:
    """Wait for the child; on a cancel request send SIGTERM, then SIGKILL after the grace period."""
    while True:
        try:
            child.wait(timeout=POLL_SECONDS)
            return False
        except subprocess.TimeoutExpired:
            pass
        record = records.load(redis, job_id)
        if record is not None and record.cancel_requested:
            break
    log.write("cancel requested: stopping the program (SIGTERM)")
    os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    return True


class JobLog:
    """A job's output: appended to its log file and its Redis stream, from two threads at once."""

    def __init__(self, redis: Redis, job_id: str, path: Path) -> None:
        self.redis, self.job_id, self.path = redis, job_id, path
        self.last_line = ""
        self.lock = threading.Lock()

    def __enter__(self) -> "JobLog":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()

    def copy_from(self, stream: IO[bytes]) -> None:
        for line in split_lines(stream):
            self.write(line)

    def write(self, line: str) -> None:
        with self.lock:
            self.file.write(line + "\n")
            self.file.flush()
            records.append_log(self.redis, self.job_id, line)
            if line.strip():
                self.last_line = line


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
