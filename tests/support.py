"""Helpers for tests that run the services as real processes."""

import codecs
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from pydantic_settings import BaseSettings
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def env_names(settings: type[BaseSettings]) -> set[str]:
    """The environment variables a pydantic-settings class reads."""
    prefix = settings.model_config.get("env_prefix", "")
    names = set()
    for field_name, field in settings.model_fields.items():
        alias = field.validation_alias
        names |= set(alias.choices) if alias is not None else {f"{prefix}{field_name}".upper()}
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ends_inside_a_character(data: bytes) -> bool:
    """The bytes end with the start of a UTF-8 character whose other bytes have not come yet."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    decoder.decode(data)
    return decoder.decode(b"", final=True) != ""


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def process_with(*words: str) -> list[int]:
    """Pids of processes whose command line contains every word."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(word.encode() in command for word in words):
                pids.append(int(entry.name))
    return pids


def parent_of(pid: int) -> int:
    return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Process:
    """A service started as a real process; its output goes to a log file shown when a test fails."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        # cwd=workdir keeps a developer's own .env (read from the working directory) out of the tests.
        self.popen = subprocess.Popen(
            command, env=env, cwd=workdir, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, 15)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, 9)
                self.popen.wait()
        self.log.close()

    def wait_healthy(self, url: str, timeout: float = 30) -> None:
        def healthy() -> bool:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.output()}")
            return http_ok(url)

        wait_until(healthy, timeout, f"{self.name} at {url}")


def fake_nvidia_smi(folder: Path, *uuids: str) -> str:
    """A PATH on which nvidia-smi lists these GPUs (`index, uuid` lines, as the real one answers the
    services' query): what a process started with it takes for a machine with those GPUs."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    listing = "".join(f"{index}, {uuid}\\n" for index, uuid in enumerate(uuids))
    script.write_text(f"#!/bin/sh\nprintf '{listing}'\n")
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


# Environment variables the services' settings read: tests set exactly the ones they mean to.
SETTINGS_PREFIXES = (
    "NANOCHAT_",
    "API_",
    "REDIS_",
    "JOB_",
    "INFERENCE_",
    "WEB_",
    "WORKER_",
    "PUBLIC_",
    "DEV_MODE",
    "WANDB_",
)


def service_env(**overrides: str) -> dict[str, str]:
    """The test process's environment without any service settings, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(SETTINGS_PREFIXES)}
    return {**env, "PYTHONUNBUFFERED": "1", **overrides}


@contextmanager
def private_redis(workdir: Path) -> Iterator[str]:
    """A redis-server on a free port, without persistence, for as long as the block runs: its URL."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed: run `make setup`")
    port = free_port()
    options = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([server, *options, "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = Redis.from_url(url)

    def answers() -> bool:
        try:
            return client.ping()
        except Exception:
            return False

    try:
        wait_until(answers, 10, "redis-server")
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(10)
