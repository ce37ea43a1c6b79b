"""Each container's command is a plain entry point: run here as a local process, it starts and is healthy."""

import json
import re
import subprocess

import httpx
import pytest

from support import PYTHON, ROOT, Process, free_port, service_env, wait_until


def container_command(service: str) -> list[str]:
    match = re.search(
        r"^CMD (\[.*\])$", (ROOT / "services" / service / "Dockerfile").read_text(), re.MULTILINE
    )
    command = json.loads(match.group(1))
    assert command[:2] == ["python", "-m"], f"{service}: CMD must be `python -m <module>`"
    return [PYTHON, *command[1:]]


@pytest.mark.parametrize(
    ("service", "extra_env"),
    [("api", {"API_TOKEN": "t" * 32}), ("inference", {"API_TOKEN": "t" * 32}), ("web", {})],
)
def test_http_services_start_and_answer_health(
    service: str, extra_env: dict, redis_url: str, tmp_path
) -> None:
    port = free_port()
    env = service_env(
        REDIS_URL=redis_url,
        NANOCHAT_BASE_DIR=str(tmp_path),  # no checkpoints: the model server starts with nothing to load
        **{f"{service.upper()}_PORT": str(port)},
        **extra_env,
    )
    process = Process(service, container_command(service), env, tmp_path)
    try:
        process.wait_healthy(f"http://127.0.0.1:{port}/health")
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
    finally:
        process.stop()
    # SIGTERM (what `docker stop` sends) shuts down gracefully; uvicorn then re-raises the signal.
    assert process.popen.returncode in (0, -15) and "Application shutdown complete" in process.output()


def test_web_serves_the_page_and_proxies_to_the_services_it_is_told(tmp_path) -> None:
    port, api_port = free_port(), free_port()  # nothing listens on api_port
    env = service_env(WEB_PORT=str(port), WEB_API_URL=f"http://127.0.0.1:{api_port}")
    process = Process("web", container_command("web"), env, tmp_path)
    try:
        process.wait_healthy(f"http://127.0.0.1:{port}/health")
        page = httpx.get(f"http://127.0.0.1:{port}/")
        assert page.status_code == 200 and "<title>nanochat-stack</title>" in page.text
        assert "script-src 'self' 'sha256-" in page.headers["content-security-policy"]
        library = httpx.get(f"http://127.0.0.1:{port}/vendor/marked/lib/marked.esm.js")
        assert library.status_code == 200 and "export" in library.text  # from node_modules, not a CDN
        unreachable = httpx.get(f"http://127.0.0.1:{port}/api/jobs")
        assert unreachable.status_code == 502
        assert f"127.0.0.1:{api_port} is unreachable" in unreachable.json()["error"]["message"]
    finally:
        process.stop()


def test_web_refuses_to_start_without_its_browser_libraries(tmp_path) -> None:
    env = service_env(WEB_PORT=str(free_port()), WEB_NODE_MODULES=str(tmp_path / "empty"))
    result = subprocess.run(
        container_command("web"), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "run `make setup`" in result.stderr


def test_worker_registers_with_rq_and_passes_its_healthcheck(redis_url: str, tmp_path) -> None:
    env = service_env(REDIS_URL=redis_url)

    def healthcheck() -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, "-m", "worker.health"], env=env, cwd=tmp_path, capture_output=True, text=True
        )

    assert healthcheck().returncode != 0  # no worker yet
    process = Process("worker", container_command("worker"), env, tmp_path)
    try:
        wait_until(lambda: healthcheck().returncode == 0, 30, "the worker to register")
    finally:
        process.stop()
    assert "listening on nanochat-jobs and nanochat-cpu-jobs" in process.output()  # GPU jobs first


def test_trainer_image_command_runs(tmp_path) -> None:
    result = subprocess.run(
        container_command("trainer"), env=service_env(), cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0 and "--vocab-size" in result.stdout
