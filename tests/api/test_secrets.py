"""No secret of a whole run is ever printed or stored. The stack (API, worker, model server) runs with a
distinctive API token, Redis password, wandb and Hugging Face tokens, and a password-protected mirror
for the pretraining shards; it runs a job whose program fails quoting the mirror's URL, then a
tokenizer job through the mirror, answers requests that carry the token in a query string or a wrong
token, and lives through a Redis outage. Then no log file, job log, job record (Redis's append-only
file holds every record and log line) or response holds any of the secrets."""

import base64
import http.server
import secrets
import subprocess
import threading
from pathlib import Path

import httpx
import pytest
from test_redis_outage import PASSWORD, RedisServer
from test_worker_loss import finished

from conftest import start_stack
from support import PYTHON, Process, free_port, service_env, wait_until

HF_TOKEN = f"hf_{secrets.token_hex(16)}"
WANDB_API_KEY = secrets.token_hex(20)
MIRROR_PASSWORD = f"mirror-{secrets.token_hex(8)}"
TOKENIZER = {"kind": "tokenizer", "config": {"vocab_size": 300, "max_chars": 200_000}}


class Mirror:
    """The kit's pretraining shards on a private HTTP server behind a password, as a company's mirror
    serves them. Until `up` it answers 503."""

    def __init__(self, folder: Path) -> None:
        expected = "Basic " + base64.b64encode(f"mirror:{MIRROR_PASSWORD}".encode()).decode()
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self) -> None:
                if self.headers.get("Authorization") != expected:
                    self.send_error(401)
                elif not mirror.up:
                    self.send_error(503)
                else:
                    super().do_GET()

            def log_message(self, *args) -> None:  # the test's output stays quiet
                pass

        self.up = False
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://mirror:{MIRROR_PASSWORD}@127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def full_run(data_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[str], str]:
    """The folders a run wrote into and what it answered, once its processes have stopped; its token."""
    mirror = Mirror(data_kit / "pretrain")
    redis = RedisServer(tmp_path_factory.mktemp("aof"))
    redis.start()
    workdir = tmp_path_factory.mktemp("secrets")
    shards = sorted((data_kit / "pretrain").glob("shard_*.parquet"))
    stack_iter = start_stack(
        redis.url,
        workdir,
        data_kit=None,  # the worker downloads the shards from the mirror
        with_worker=True,
        NANOCHAT_PRETRAIN_URL=mirror.url,
        NANOCHAT_PRETRAIN_LAST_SHARD=str(len(shards) - 1),
        HF_TOKEN=HF_TOKEN,
        WANDB_API_KEY=WANDB_API_KEY,
    )
    stack = next(stack_iter)
    port = free_port()
    inference = Process(
        "inference", [PYTHON, "-m", "inference"], {**stack.env, "INFERENCE_PORT": str(port)}, workdir
    )
    answers: list[str] = []
    try:
        inference.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=60)
        with stack.client() as client:
            failing = client.post("/jobs", json={**TOKENIZER, "run": "offline"}).json()
            answers.append(str(finished(stack, failing["id"], timeout=120)))  # the mirror is down
            mirror.up = True
            job = client.post("/jobs", json={**TOKENIZER, "run": "online"}).json()
            answers.append(str(finished(stack, job["id"], timeout=120)))
            for job_id in (failing["id"], job["id"]):
                answers.append(client.get(f"/jobs/{job_id}/logs").text)
        with (
            httpx.Client(base_url=stack.api_url) as api,
            httpx.Client(base_url=f"http://127.0.0.1:{port}") as model_server,
        ):
            wrong = {"Authorization": "Bearer not-the-token-but-long-enough"}
            refused = [
                api.get(f"/jobs?token={stack.token}"),  # a token in the URL is not taken, nor logged
                api.get(f"/jobs/{job['id']}/logs?follow=true&access_token={stack.token}"),
                api.get(f"/jobs/{stack.token}"),  # pasted where the job id goes
                api.post("/jobs", json={**TOKENIZER, "run": "x"}, headers=wrong),
                model_server.get(f"/v1/models?api_key={stack.token}"),
                model_server.get("/v1/models", headers=wrong),
            ]
            assert [r.status_code for r in refused] == [401] * len(refused)
            answers += [r.text for r in refused]
            redis.stop()
            answers.append(api.get("/jobs", headers={"Authorization": f"Bearer {stack.token}"}).text)  # 503
            offline = stack.start_worker("worker-during-outage")
            assert offline.popen.wait(30) != 0  # it cannot reach Redis, and says so
            offline.stop()
            redis.start()
            wait_until(lambda: api.get("/health").status_code == 200, 30, "the API's Redis")
    finally:
        inference.stop()
        next(stack_iter, None)
        redis.stop()
        mirror.server.shutdown()
    return [workdir, redis.folder], answers, stack.token


def test_no_log_record_or_answer_of_a_full_run_holds_a_secret(
    full_run: tuple[list[Path], list[str], str],
) -> None:
    folders, answers, token = full_run
    hidden = {
        "the API token": token,
        "the Redis password": PASSWORD,
        "HF_TOKEN": HF_TOKEN,
        "WANDB_API_KEY": WANDB_API_KEY,
        "the mirror's password": MIRROR_PASSWORD,
    }
    files = [path for folder in folders for path in folder.rglob("*") if path.is_file()]
    assert any(path.name == "worker.log" for path in files) and any(p.suffix == ".aof" for p in files)
    contents = {str(p): p.read_bytes() for p in files} | {
        f"answer {i}": a.encode() for i, a in enumerate(answers)
    }
    found = [
        f"{what} in {where}"
        for what, secret in hidden.items()
        for where, content in contents.items()
        if secret.encode() in content
    ]
    assert found == []
    # The lines that held them are still there, masked: the job's error names the mirror it failed on.
    assert "http://mirror:***@127.0.0.1" in answers[0]
    assert "?token=***" in (folders[0] / "api.log").read_text()


SHORT_TOKEN = secrets.token_hex(7)  # 14 characters: too short for API_TOKEN


def any_part(secret: str, text: str, size: int = 8) -> bool:
    """Whether `text` holds `size` characters of `secret` in a row (pydantic cuts long values short)."""
    return any(secret[i : i + size] in text for i in range(len(secret) - size + 1))


@pytest.mark.parametrize(
    ("service", "setting", "value"),
    [
        ("api", "API_TOKEN", SHORT_TOKEN),
        ("inference", "API_TOKEN", SHORT_TOKEN),
        ("worker", "WORKER_GPUS", "0;x"),
    ],
)
def test_a_service_that_refuses_its_settings_says_why_without_quoting_them(
    service: str, setting: str, value: str, tmp_path: Path
) -> None:
    """Pydantic's message quotes the input: the model server's once printed parts of its token and of
    REDIS_URL's password."""
    password = secrets.token_hex(12)
    redis_url = f"redis://:{password}@127.0.0.1:{free_port()}/0"
    env = service_env(**{"API_TOKEN": SHORT_TOKEN, "REDIS_URL": redis_url, setting: value})
    result = subprocess.run(
        [PYTHON, "-m", service], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and setting in result.stderr  # it says what is wrong ...
    assert not any_part(SHORT_TOKEN, result.stderr)  # ... and quotes no secret
    assert not any_part(password, result.stderr)
