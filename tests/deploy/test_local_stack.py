"""`make up`'s launcher starts every service as a local process, and Ctrl-C stops all of them."""

import signal
import subprocess

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
