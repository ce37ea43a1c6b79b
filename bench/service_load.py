"""
The job service under load and faults, everything on 127.0.0.1, in two parts.

Indexes: what listing jobs and the run/stage conflict check cost with 1,000 and 100,000 job records in
Redis (each a median over repeated calls, in this process against a private redis-server), next to what
reading every record costs (what the listing did before the indexes), and the one-off indexing of
100,000 records an older version stored.

Load and faults: a private Redis (append-only file, as compose runs it), the API, a worker and the model
server (a random-weight d2 model: the server's work, not the answers, is measured) as real processes.
For --seconds: --chats concurrent streaming chats, --submit-rate job submissions a second (tiny
tokenizer jobs, each its own run) and --followers clients following job logs over SSE (reconnecting
with Last-Event-ID, as browsers do), while the worker is SIGKILLed (its process group: worker, work
horse and program) at 30% of the time and a new one started, and Redis is restarted (SIGTERM, then the
same port and files) at 60%. Then it checks that nothing was lost: every accepted job has its record
and is on the queue, running or ended; each ended job's log in Redis equals its log file, line for
line; and each follower got exactly the stream's lines, in order, none twice.

Prints tables and one JSON line.

    .venv/bin/python bench/service_load.py [--parts indexes load] [--seconds 60] [--chats 64]
        [--submit-rate 20] [--followers 200]
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
from jobs import queue, records
from jobs.records import JobRecord, JobStatus
from jobs.specs import JOB_SPEC
from redis import Redis
from safetensors.torch import save_file

from trainer import scaling, tok_train
from trainer.checkpoint import step_dir
from trainer.gpt import GPT

ROOT = Path(__file__).resolve().parent.parent
LEASE_SECONDS = 5  # the killed worker's job is re-queued within about two leases
SETTING_PREFIXES = ("NANOCHAT_", "API_", "REDIS_", "JOB_", "INFERENCE_", "WEB_", "WORKER_", "PUBLIC_")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else None


class RedisServer:
    """A redis-server of our own on 127.0.0.1 that can be restarted on the same port and files."""

    def __init__(self, folder: Path, persistent: bool) -> None:
        self.folder, self.port = folder, free_port()
        self.options = ["--appendonly", "yes"] if persistent else ["--appendonly", "no"]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self.process = subprocess.Popen(
            [*command, *self.options, "--dir", str(self.folder)], stdout=subprocess.DEVNULL
        )
        client = Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        self.process.terminate()  # a clean shutdown: the append-only file is flushed
        self.process.wait(30)


# Part 1: what listing and the conflict check cost, by the number of records.


def fill(redis: Redis, count: int) -> None:
    """`count` ended jobs over 1,000 runs and five kinds, and one queued tokenizer job in run r0."""
    kinds = ["tokenizer", "base_train", "chat_sft", "base_eval", "chat_eval"]
    statuses = [JobStatus.FINISHED] * 7 + [JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED]
    with redis.pipeline(transaction=False) as pipe:
        for i in range(count):
            records.add(pipe, JobRecord.new(kinds[i % 5], f"r{i % 1000}", {}, statuses[i % 10]))
            if i % 2000 == 1999:
                pipe.execute()
        pipe.execute()
    queue.submit(redis, JOB_SPEC.validate_python({"kind": "tokenizer", "run": "r0", "config": {}}))


def median_ms(action: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def read_every_record(redis: Redis) -> int:
    """What the listing and the conflict check did before the indexes: every record, 200 at a time."""
    count, start = 0, 0
    while ids := [i.decode() for i in redis.zrevrange(records.JOBS_INDEX, start, start + 199)]:
        count += len(records.load_many(redis, ids))
        start += 200
    return count


def index_costs(folder: Path, sizes: list[int], repeats: int) -> list[dict]:
    server = RedisServer(folder, persistent=False)
    redis = Redis.from_url(server.url)
    spec = {"kind": "tokenizer", "config": {}}
    operations: dict[str, Callable[[], object]] = {
        "newest 50": lambda: records.list_records(redis),
        "status=queued": lambda: records.list_records(redis, status="queued"),
        "status=finished, offset 10,000": lambda: records.list_records(
            redis, status="finished", offset=10_000
        ),
        "run=r7": lambda: records.list_records(redis, run="r7"),
        "status=failed & run=r7": lambda: records.list_records(redis, status="failed", run="r7"),
        "status=finished & kind=base_train": lambda: records.list_records(
            redis, status="finished", kind="base_train"
        ),
        "submit, refused (conflict check)": lambda: refused(redis, {**spec, "run": "r0"}),
        "DELETE /models check (active jobs of a run)": lambda: queue.active_jobs(redis, "r7"),
    }
    rows = []
    try:
        for size in sizes:
            redis.flushall()
            fill(redis, size)
            row = {"records": size, **{name: median_ms(op, repeats) for name, op in operations.items()}}
            row["read every record (before)"] = median_ms(lambda: read_every_record(redis), 3)
            if size == max(sizes):  # the one-off indexing of records an older version stored
                redis.delete(*redis.keys("nanochat:jobs:*"), *redis.keys("nanochat:run:*"))
                row["index legacy records, once"] = median_ms(lambda: records.ensure_indexed(redis), 1)
                assert records.list_records(redis, status="queued")[1] == 1
            rows.append(row)
    finally:
        server.stop()
    return rows


def refused(redis: Redis, spec: dict) -> None:
    try:
        queue.submit(redis, JOB_SPEC.validate_python(spec))
    except queue.Conflict:
        return
    raise AssertionError("the conflict check let a second writer through")


# Part 2: load and faults.


@dataclass
class Tally:
    """Latencies (seconds) and outcomes of one kind of request."""

    latencies: list[float] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)

    def record(self, outcome: str | int, seconds: float | None = None) -> None:
        self.outcomes[str(outcome)] += 1
        if seconds is not None:
            self.latencies.append(seconds)

    def summary(self) -> dict:
        return {
            "count": len(self.latencies),
            "p50_ms": round(1000 * percentile(self.latencies, 0.5), 1) if self.latencies else None,
            "p99_ms": round(1000 * percentile(self.latencies, 0.99), 1) if self.latencies else None,
            "outcomes": dict(self.outcomes),
        }


def outcome_of(error: Exception) -> str:
    return (
        str(error.response.status_code) if isinstance(error, httpx.HTTPStatusError) else type(error).__name__
    )


class Stack:
    """Redis, the API, a worker and the model server as processes, their output in files."""

    def __init__(self, base: Path, data_dir: Path, followers: int, chats: int) -> None:
        self.base, self.token = base, secrets.token_urlsafe(24)
        self.redis_server = RedisServer(base, persistent=True)
        self.api_port, self.inference_port = free_port(), free_port()
        clean = {k: v for k, v in os.environ.items() if not k.startswith(SETTING_PREFIXES)}
        self.env = clean | {
            "PYTHONUNBUFFERED": "1",
            "NANOCHAT_BASE_DIR": str(base),
            "NANOCHAT_DATA_DIR": str(data_dir),
            "API_TOKEN": self.token,
            "API_PORT": str(self.api_port),
            "API_MAX_FOLLOWERS_PER_JOB": str(followers),
            "API_MAX_FOLLOWERS": str(followers + 16),
            "JOB_LEASE_SECONDS": str(LEASE_SECONDS),
            "INFERENCE_PORT": str(self.inference_port),
            "INFERENCE_MAX_BATCH_SIZE": str(chats),
            "INFERENCE_MAX_WAITING": str(chats),
            "INFERENCE_DEVICE": "cpu",
        }
        self.processes: dict[str, subprocess.Popen] = {}
        self.start("inference", "inference")  # no REDIS_URL: it never gives its device up here
        self.env["REDIS_URL"] = self.redis_server.url
        self.start("api", "api")
        self.start("worker", "worker")
        self.wait_for(f"http://127.0.0.1:{self.api_port}/health")
        self.wait_for(f"http://127.0.0.1:{self.inference_port}/ready")

    def start(self, name: str, module: str) -> None:
        log = open(self.base / f"{name}.log", "ab")  # noqa: SIM115 (the process holds it)
        self.processes[name] = subprocess.Popen(
            [sys.executable, "-m", module], env=self.env, cwd=self.base, stdout=log, stderr=log,
            start_new_session=True,
        )  # fmt: skip

    def wait_for(self, url: str) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, headers=headers, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{url} did not answer; see the logs in {self.base}")

    def kill_worker(self) -> None:
        """SIGKILL the worker, its work horse (RQ gives it a session of its own) and the job's program."""
        for pid in [self.processes["worker"].pid, *descendants(self.processes["worker"].pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.processes["worker"].wait()

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        self.redis_server.stop()


def descendants(pid: int) -> list[int]:
    """The processes started by `pid`, their children, and so on."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            if entry.name.isdigit():
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        born = children.get(todo.pop(), [])
        found += born
        todo += born
    return found


def write_chat_model(base: Path, data_dir: Path) -> None:
    """Run `chat`: a vocab-4,096 tokenizer trained on the data kit and a random-weight d2 sft checkpoint."""
    os.environ.update(NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATA_DIR=str(data_dir))  # never a download
    tok_train.main(["--run", "chat", "--vocab-size", "4096", "--max-chars", "2000000"])
    torch.manual_seed(0)
    model = GPT(scaling.model_config(2, 4096, 512, head_dim=64))
    model.init_weights()
    with torch.no_grad():  # zero-initialised projections would make every layer an identity
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = step_dir(base / "runs" / "chat" / "sft", 1)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    meta = {"step": 1, "model_config": model.config.to_dict(), "compute_dtype": "float32", "world_size": 1}
    (folder / "meta.json").write_text(json.dumps(meta))


class Load:
    """The clients: chats, submissions and log followers, until `deadline` (monotonic)."""

    def __init__(self, stack: Stack, deadline: float, followers: int) -> None:
        self.stack, self.deadline, self.followers = stack, deadline, followers
        self.chats, self.first_tokens, self.submits, self.follows = Tally(), Tally(), Tally(), Tally()
        self.accepted: list[str] = []  # job ids, in submission order
        self.received: dict[tuple[int, str], list[tuple[str, str]]] = {}  # (follower, job) → lines
        self.complete: set[tuple[int, str]] = set()  # follows that reached the `end` event
        self.lag: list[float] = []  # seconds from a line's entry in Redis to a follower

    def client(self, port: int, connections: int) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {self.stack.token}"},
            timeout=httpx.Timeout(60, read=120),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        )

    async def chat(self, client: httpx.AsyncClient, number: int) -> None:
        body = {
            "model": "chat-sft-000001",
            "messages": [{"role": "user", "content": f"Chat {number}: tell me about the number {number}."}],
            "max_tokens": 32,
            "temperature": 0.8,
            "stream": True,
        }
        while time.monotonic() < self.deadline:
            start = time.monotonic()
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    response.raise_for_status()
                    first = None
                    async for line in response.aiter_lines():
                        if first is None and '"content": "' in line and '"content": ""' not in line:
                            first = time.monotonic() - start
                self.chats.record(response.status_code, time.monotonic() - start)
                self.first_tokens.record(response.status_code, first)
            except httpx.HTTPError as error:
                self.chats.record(outcome_of(error))
                await asyncio.sleep(0.5)

    async def submit(self, client: httpx.AsyncClient, number: int) -> None:
        spec = {
            "kind": "tokenizer",
            "run": f"load{number}",
            "config": {"vocab_size": 300, "max_chars": 10_000},
        }
        start = time.monotonic()
        try:
            response = await client.post("/jobs", json=spec)
            response.raise_for_status()
            self.submits.record(response.status_code, time.monotonic() - start)
            self.accepted.append(response.json()["id"])
        except httpx.HTTPError as error:
            self.submits.record(outcome_of(error))

    async def submitter(self, client: httpx.AsyncClient, rate: float) -> None:
        pending, number, start = set(), 0, time.monotonic()
        while time.monotonic() < self.deadline:
            task = asyncio.create_task(self.submit(client, number))
            pending.add(task)
            task.add_done_callback(pending.discard)
            number += 1
            await asyncio.sleep(max(0.0, start + number / rate - time.monotonic()))
        await asyncio.gather(*pending)

    async def follower(self, client: httpx.AsyncClient, number: int, per_job: int) -> None:
        """Follow the jobs in submission order (this follower's share of each), each to its end."""
        index = number // per_job
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self.deadline):  # a follow still open then is cut there
                while True:
                    if index >= len(self.accepted):
                        await asyncio.sleep(0.2)
                        continue
                    await self.follow(client, number, self.accepted[index])
                    index += self.followers // per_job

    async def follow(self, client: httpx.AsyncClient, number: int, job_id: str) -> None:
        lines = self.received.setdefault((number, job_id), [])
        while True:
            headers = {"Last-Event-ID": lines[-1][0]} if lines else {}
            start, event, data, entry = time.monotonic(), "message", None, None
            try:
                async with client.stream(
                    "GET", f"/jobs/{job_id}/logs", params={"follow": "true"}, headers=headers
                ) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if line.startswith("event: "):
                            event = line.removeprefix("event: ")
                        elif line.startswith("id: "):
                            entry = line.removeprefix("id: ")
                        elif line.startswith("data: "):
                            data = line.removeprefix("data: ")
                        elif not line and data is not None:
                            if event == "end":
                                self.follows.record(response.status_code, time.monotonic() - start)
                                self.complete.add((number, job_id))
                                return
                            lines.append((entry, data))
                            self.lag.append(time.time() - int(entry.split("-")[0]) / 1000)
                            event, data = "message", None
                self.follows.record("cut")  # the server closed the stream early: reconnect
            except httpx.HTTPError as error:
                self.follows.record(outcome_of(error))
            await asyncio.sleep(0.5)

    async def run(self, chats: int, rate: float) -> None:
        per_job = 8
        async with (
            self.client(self.stack.inference_port, chats) as chat_client,
            self.client(self.stack.api_port, 64) as submit_client,
            self.client(self.stack.api_port, self.followers) as follow_client,
        ):
            await asyncio.gather(
                *(self.chat(chat_client, i) for i in range(chats)),
                self.submitter(submit_client, rate),
                *(self.follower(follow_client, i, per_job) for i in range(self.followers)),
            )


async def faults(stack: Stack, seconds: float, events: list[str]) -> None:
    start = time.monotonic()
    await asyncio.sleep(0.3 * seconds)
    stack.kill_worker()
    events.append(f"{time.monotonic() - start:.1f}s: worker SIGKILLed")
    await asyncio.sleep(2)
    stack.start("worker", "worker")
    events.append(f"{time.monotonic() - start:.1f}s: a new worker started")
    await asyncio.sleep(max(0.0, start + 0.6 * seconds - time.monotonic()))
    await asyncio.to_thread(stack.redis_server.restart)
    events.append(f"{time.monotonic() - start:.1f}s: Redis restarted")


def losses(stack: Stack, load: Load) -> dict:
    """What was lost: jobs, log lines in Redis (against each ended job's log file), lines followers
    missed or got twice."""
    redis = Redis.from_url(stack.redis_server.url)
    on_queue = {i for kind in queue.QUEUE_NAMES for i in queue.rq_queue(redis, kind).job_ids}
    jobs = {job_id: records.load(redis, job_id) for job_id in load.accepted}
    found = [r for r in jobs.values() if r is not None]

    def stranded(record: JobRecord) -> bool:
        """Queued but not on RQ's queue, or started with no live worker: it would never end."""
        if record.status == JobStatus.QUEUED:
            return record.rq_job_id not in on_queue
        return record.status == JobStatus.STARTED and not redis.exists(records.lease_key(record.id))

    ended = [r for r in found if not r.is_active]
    streams = {i: records.read_log_page(redis, i, 0, 1_000_000) for i in jobs}
    log_mismatch = [
        r.id
        for r in ended
        if (stack.base / "runs" / r.run / "logs" / f"{r.id}.log").read_text().splitlines()
        != [line for _, line in streams[r.id]]
    ]
    follower_mismatch = [
        key
        for key, lines in load.received.items()
        if lines != streams[key[1]][: len(lines)] or (key in load.complete and lines != streams[key[1]])
    ]
    return {
        "jobs_accepted": len(load.accepted),
        "records_in_redis": redis.zcard(records.JOBS_INDEX),
        "jobs_missing": len(jobs) - len(found),
        "jobs_stranded": sum(map(stranded, found)),
        "jobs_ended": len(ended),
        "jobs_requeued_after_their_worker_died": sum(
            any((a.end_reason or "").startswith("worker lost") for a in r.attempts) for r in found
        ),
        "status": dict(Counter(str(r.status) for r in found)),
        "ended_logs_differing_from_their_files": len(log_mismatch),
        "log_lines_of_ended_jobs": sum(len(streams[r.id]) for r in ended),
        "follows": len(load.received),
        "follows_complete": len(load.complete),
        "follows_with_lines_missing_or_twice": len(follower_mismatch),
        "lines_followed": sum(len(lines) for lines in load.received.values()),
    }


def load_and_faults(folder: Path, data_dir: Path, args: argparse.Namespace) -> dict:
    write_chat_model(folder, data_dir)
    stack = Stack(folder, data_dir, args.followers, args.chats)
    events: list[str] = []
    try:
        deadline = time.monotonic() + args.seconds
        load = Load(stack, deadline, args.followers)

        async def everything() -> None:
            await asyncio.gather(load.run(args.chats, args.submit_rate), faults(stack, args.seconds, events))

        asyncio.run(everything())
        time.sleep(3 * LEASE_SECONDS)  # the reaper re-queues the killed worker's job
        lost = losses(stack, load)
    finally:
        stack.stop()
    return {
        "events": events,
        "chats": load.chats.summary(),
        "chat_first_tokens": load.first_tokens.summary(),
        "submits": load.submits.summary(),
        "follows": load.follows.summary(),
        "line_lag_p50_ms": round(1000 * percentile(load.lag, 0.5), 1) if load.lag else None,
        "line_lag_p99_ms": round(1000 * percentile(load.lag, 0.99), 1) if load.lag else None,
        "lost": lost,
    }


def print_indexes(rows: list[dict]) -> None:
    names = [name for name in rows[-1] if name != "records"]
    print(f"{'ms (median)':<46}" + "".join(f"{row['records']:>12,}" for row in rows))
    for name in names:
        values = [row.get(name) for row in rows]
        print(f"{name:<46}" + "".join(f"{v:>12.2f}" if v is not None else f"{'':>12}" for v in values))


def print_load(result: dict, args: argparse.Namespace) -> None:
    print(
        f"\n{args.seconds} s: {args.chats} streaming chats, {args.submit_rate} submissions/s, "
        f"{args.followers} log followers | " + "; ".join(result["events"])
    )
    print(f"{'requests':<34}{'done':>8}{'p50 ms':>10}{'p99 ms':>10}  outcomes")
    labels = {
        "chat_first_tokens": "chat (first token)",
        "chats": "chat (whole streamed reply)",
        "submits": "POST /jobs",
        "follows": "log follow (connect → end event)",
    }
    for key, label in labels.items():
        s = result[key]
        print(
            f"{label:<34}{s['count']:>8}{s['p50_ms'] or 0:>10.1f}{s['p99_ms'] or 0:>10.1f}  {s['outcomes']}"
        )
    lag = f"{result['line_lag_p50_ms'] or 0:>10.1f}{result['line_lag_p99_ms'] or 0:>10.1f}"
    print(f"{'log line, Redis → follower':<34}{'':>8}{lag}")
    print("lost: " + ", ".join(f"{k} {v}" for k, v in result["lost"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=["indexes", "load"], default=["indexes", "load"])
    parser.add_argument("--records", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--repeats", type=int, default=50, help="calls per index measurement (median)")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--chats", type=int, default=64)
    parser.add_argument("--submit-rate", type=float, default=20)
    parser.add_argument("--followers", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed: run `make setup`")
    data_dir = Path(os.environ.get("NANOCHAT_DATA_DIR") or ROOT.parent / "shared" / "data")
    if "load" in args.parts and not (data_dir / "pretrain").is_dir():
        raise SystemExit(f"no data kit at {data_dir}: set NANOCHAT_DATA_DIR (the tokenizer jobs read it)")
    result: dict = {"bench": "service_load", "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    with tempfile.TemporaryDirectory(prefix="nanochat-service-load-") as scratch:
        if "indexes" in args.parts:
            (Path(scratch) / "indexes").mkdir()
            result["indexes"] = index_costs(Path(scratch) / "indexes", args.records, args.repeats)
            print_indexes(result["indexes"])
        if "load" in args.parts:
            (Path(scratch) / "load").mkdir()
            result["load"] = load_and_faults(Path(scratch) / "load", data_dir, args)
            result["load"]["settings"] = vars(args)
            print_load(result["load"], args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
