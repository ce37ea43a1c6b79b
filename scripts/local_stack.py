"""
`make up`: the whole stack as plain local processes — redis-server, api, worker, cpu-worker (a worker
of the jobs that use no GPU: WORKER_QUEUES=cpu), inference, web — with each one's output prefixed by
its name. Ctrl-C stops all of them. `make demo` (--demo) is the
product tour: it also runs the tiny CPU demo pipeline through the API, shows its progress here and, once
the chat model is ready, the chat page's address with that model chosen.

Settings come from the environment or .env, as for each service. Without API_TOKEN a token is made
for this session and printed. Redis keeps its data (append-only) under $NANOCHAT_BASE_DIR/runs/_redis/.
"""

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HEALTH_TIMEOUT_S = 60
DEMO_POLL_S = 2
PRESETS = ROOT / "services" / "web" / "web" / "static" / "presets.json"  # the web UI's job presets


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a .env file (comments and blank lines skipped), as compose reads them."""
    if not path.exists():
        return {}
    pairs = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            pairs[key.strip()] = value.strip().strip("'\"")
    return pairs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """Child processes started in order and stopped in reverse, their output forwarded with a prefix."""

    def __init__(self) -> None:
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        threading.Thread(target=self.forward, args=(name, process), daemon=True).start()
        self.processes.append((name, process))

    @staticmethod
    def forward(name: str, process: subprocess.Popen) -> None:
        for raw in process.stdout:
            print(f"{name:>10} | {raw.decode('utf-8', 'replace').rstrip()}", flush=True)

    def exited(self) -> str | None:
        return next((name for name, p in self.processes if p.poll() is not None), None)

    def stop(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave orphans behind
        for _, process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name, process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop in time: killing it", flush=True)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def wait_healthy(stack: Stack, urls: dict[str, str]) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    pending = dict(urls)
    while pending:
        if (name := stack.exited()) is not None:
            raise RuntimeError(f"{name} exited during start-up (see its output above)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not healthy after {HEALTH_TIMEOUT_S}s: {', '.join(pending)}")
        for name, url in list(pending.items()):
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        del pending[name]
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.3)


def api_call(
    base_url: str, token: str, path: str, body: dict | None = None, timeout: float = 10, text: bool = False
) -> Any:
    """GET (or POST `body` to) a service of the stack with the token; its JSON answer (or its text)."""
    request = urllib.request.Request(
        f"{base_url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read().decode() if text else json.load(response)


def demo_preset() -> dict:
    """The web UI's tiny CPU demo pipeline preset: its `about` text and its job `spec`."""
    return json.loads(PRESETS.read_text())["tiny CPU demo pipeline"]


def stage_line(stage: dict) -> str:
    progress = stage.get("progress") or {}
    parts = [f"{stage['kind']:<11}", f"{stage['status']:<9}"]
    if stage["status"] == "started" and "percent" in progress:
        parts.append(f"{progress['percent']:5.1f}%")
        if "eta_seconds" in progress:
            parts.append(f"ETA {progress['eta_seconds'] / 60:.1f} min")
    if stage.get("error"):
        parts.append(stage["error"])
    return "  ".join(parts)


def run_demo(api_url: str, token: str, web_url: str) -> None:
    """The product tour: submit the tiny CPU demo pipeline (the web UI's first preset) through the API,
    show each stage's progress here, and when the chat model is ready, where to talk to it."""
    preset = demo_preset()
    pipeline = api_call(api_url, token, "/jobs", preset["spec"])
    run = pipeline["run"]
    print(f"\nmake demo: {preset['about']}", flush=True)
    print(f"  pipeline {pipeline['id']}: follow it at {web_url}/#/jobs/{pipeline['id']}\n", flush=True)
    shown: dict[str, tuple] = {}
    while True:
        pipeline = api_call(api_url, token, f"/jobs/{pipeline['id']}")
        for stage_id in pipeline["stages"]:
            stage = api_call(api_url, token, f"/jobs/{stage_id}")
            step = (stage["status"], int((stage.get("progress") or {}).get("percent", 0) // 10))
            if shown.get(stage_id) != step:  # a line when a stage changes status or passes a tenth
                print(f"     demo | {stage_line(stage)}", flush=True)
                shown[stage_id] = step
        if pipeline["status"] not in ("waiting", "queued", "started"):
            break
        time.sleep(DEMO_POLL_S)
    if pipeline["status"] != "finished":
        print(f"\nthe demo pipeline ended {pipeline['status']}: see its log at {web_url}/#/jobs", flush=True)
        return
    print(f"\nThe chat model {run}-sft is ready. Talk to it: {web_url}/#/chat?model={run}-sft", flush=True)
    print("(the page asks once for the API token printed above)\n", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--demo", action="store_true", help="run the tiny demo pipeline and point to the chat page"
    )
    args = parser.parse_args()

    env = {**read_dotenv(ROOT / ".env"), **os.environ}
    if not env.get("API_TOKEN"):
        env["API_TOKEN"] = secrets.token_urlsafe(24)
    env.setdefault("NANOCHAT_BASE_DIR", str(Path("~/.cache/nanochat").expanduser()))
    redis_dir = Path(env["NANOCHAT_BASE_DIR"]).expanduser() / "runs" / "_redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    redis_port, redis_password = free_port(), secrets.token_urlsafe(24)
    env["REDIS_URL"] = f"redis://:{redis_password}@127.0.0.1:{redis_port}/0"
    ports = {
        name: int(env.get(f"{name.upper()}_PORT", default))
        for name, default in [("api", 8000), ("inference", 8001), ("web", 8080)]
    }
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    env.setdefault("WEB_API_URL", urls["api"])
    env.setdefault("WEB_INFERENCE_URL", urls["inference"])

    python = sys.executable
    stack = Stack()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop cleanly when killed, like Ctrl-C
    try:
        stack.start(
            "redis",
            [
                "redis-server",
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(redis_dir),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
                "--requirepass",
                redis_password,
            ],
            env,
        )
        stack.start("api", [python, "-m", "api"], env)
        stack.start("worker", [python, "-m", "worker"], env)
        stack.start("cpu-worker", [python, "-m", "worker"], env | {"WORKER_QUEUES": "cpu"})
        stack.start("inference", [python, "-m", "inference"], env)
        stack.start("web", [python, "-m", "web"], env)
        wait_healthy(stack, {name: f"{url}/health" for name, url in urls.items()})
        print("\nnanochat-stack is up:", flush=True)
        print(f"  web UI      {urls['web']}")
        print(f"  API         {urls['api']}  (docs: {urls['api']}/docs)")
        print(f"  inference   {urls['inference']}")
        print(f"  redis       127.0.0.1:{redis_port}, password in REDIS_URL  (data: {redis_dir})")
        print(f"  API token   {env['API_TOKEN']}")
        print("Ctrl-C stops everything.\n", flush=True)
        if args.demo:
            run_demo(urls["api"], env["API_TOKEN"], urls["web"])
        while (name := stack.exited()) is None:
            time.sleep(0.5)
        print(f"{name} exited unexpectedly: stopping the stack", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nstopping...", flush=True)
        return 0
    except RuntimeError as error:
        print(f"error: {error}", flush=True)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
