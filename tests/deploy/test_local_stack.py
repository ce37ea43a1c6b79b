"""`make up`'s launcher starts every service as a local process, and Ctrl-C stops all of them;
`make demo` takes a new user from nothing to a chat model."""

import re
import signal
import subprocess
from pathlib import Path

import httpx

from support import PYTHON, ROOT, free_port, service_env, wait_until


def test_local_stack_starts_everything_and_stops_cleanly_on_ctrl_c(tmp_path) -> None:
    ports = {name: free_port() for name in ("api", "inference", "web")}
    env = service_env(
        NANOCHAT_BASE_DIR=str(tmp_path / "base"),
        **{f"{name.upper()}_PORT": str(p) for name, p in ports.items()},
    )
    log = tmp_path / "stack.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            [PYTHON, "scripts/local_stack.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            wait_until(
                lambda: "nanochat-stack is up" in log.read_text() or launcher.poll() is not None,
                90,
                "start-up",
            )
            assert launcher.poll() is None, log.read_text()
            for name, port in ports.items():
                assert httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200, name
            output = log.read_text()
            token = next(line.split()[-1] for line in output.splitlines() if "API token" in line)
            assert (tmp_path / "base" / "runs" / "_redis").is_dir()
            listening = re.compile(r"^ *(worker|cpu-worker) \| .* listening on (.*) \(runs in", re.MULTILINE)
            wait_until(lambda: len(listening.findall(log.read_text())) == 2, 30, "both workers")
            assert dict(listening.findall(log.read_text())) == {
                "worker": "nanochat-jobs and nanochat-cpu-jobs",  # the first when both hold a job
                "cpu-worker": "nanochat-cpu-jobs",
            }
            submitted = httpx.post(
                f"http://127.0.0.1:{ports['api']}/jobs",
                json={"kind": "tokenizer", "run": "x", "config": {"vocab_size": 300}},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert submitted.status_code == 201
            launcher.send_signal(signal.SIGINT)
            assert launcher.wait(timeout=30) == 0
        finally:
            if launcher.poll() is None:
                launcher.kill()
    for name, port in ports.items():  # nothing is left listening
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            raise AssertionError(f"{name} still answers after Ctrl-C")
        except httpx.ConnectError:
            pass
    assert "stopping" in log.read_text()


def test_demo_trains_a_chat_model_and_points_to_its_chat_page(data_kit: Path, tmp_path: Path) -> None:
    """`make demo`, the product tour: the tiny pipeline through the API, its progress, then the chat
    page's address with the new model chosen, served through the web UI's proxy."""
    ports = {name: free_port() for name in ("api", "inference", "web")}
    env = service_env(
        NANOCHAT_BASE_DIR=str(tmp_path / "base"),
        NANOCHAT_DATA_DIR=str(data_kit),
        **{f"{name.upper()}_PORT": str(p) for name, p in ports.items()},
    )
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        launcher = subprocess.Popen(
            [PYTHON, "scripts/local_stack.py", "--demo"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(
                lambda: "Talk to it:" in log.read_text() or launcher.poll() is not None, 600, "the demo"
            )
            output = log.read_text()
            assert launcher.poll() is None, output
            # The services log to the same terminal: a line of theirs may run into one of the demo's.
            for stage in ("tokenizer", "base_train", "chat_sft"):
                assert re.search(rf"demo \| {stage} +finished", output), stage
            assert re.search(r"demo \| \w+ +started +[\d.]+% +ETA", output)  # progress while it trains
            chat_url = f"http://127.0.0.1:{ports['web']}/#/chat?model=demo-sft"
            assert chat_url in output
            token = next(line.split()[-1] for line in output.splitlines() if "API token" in line)
            models = httpx.get(
                f"http://127.0.0.1:{ports['web']}/v1/models", headers={"Authorization": f"Bearer {token}"}
            ).json()
            assert "demo-sft" in [m["id"] for m in models["data"]]
            launcher.send_signal(signal.SIGINT)
            assert launcher.wait(timeout=30) == 0
        finally:
            if launcher.poll() is None:
                launcher.kill()
