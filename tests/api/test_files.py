"""Files through the API: every refused upload leaves nothing behind, a job naming a file that is not
ready is refused, a file in use is not deleted (no worker: validation stays queued); then with a worker,
as a new user would: a broken ShareGPT file named line by line, the fixed one ready, and text files as a
corpus for a tokenizer and base pretraining; and a worker of CPU jobs alone validates a file while
training waits for another worker."""

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import Stack, start_stack
from support import PYTHON, Process, private_redis, wait_until

UPLOAD_LIMIT = 3_000_000  # more than API_MAX_BODY_BYTES (1 MB): uploads have their own limit
SHAREGPT = {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4."}]}


def jsonl(*rows: object) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def leftovers(stack: Stack) -> list[str]:
    """What is in the files folder: file ids, and any upload's temporary folder."""
    folder = stack.base_dir / "files"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture(scope="module")
def api(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """No worker: a file stays `validating`, its validation job queued."""
    workdir = tmp_path_factory.mktemp("files-api")
    yield from start_stack(
        redis_url, workdir, None, with_worker=False, API_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT)
    )


def upload(
    client: httpx.Client, purpose: str | None, *files: tuple[str, bytes], **fields: str
) -> httpx.Response:
    form = {"purpose": purpose, **fields} if purpose else fields  # multipart even without a file
    parts = [(name, (None, value)) for name, value in form.items()] + [("file", f) for f in files]
    return client.post("/files", files=parts)


@pytest.mark.parametrize(
    ("purpose", "files", "fields", "code", "says"),
    [
        ("conversations", [("chats.parquet", b"PAR1")], {}, 415, "a conversations file is .jsonl"),
        ("pretrain", [("run.exe", b"MZ")], {}, 415, "a pretrain file is .parquet, .jsonl, .txt, .md"),
        ("mixture", [("mix.json", b"{}")], {}, 415, "a mixture file is .yaml, .yml"),
        ("weights", [("a.jsonl", b"{}\n")], {}, 422, "purpose"),
        (None, [("a.jsonl", b"{}\n")], {}, 422, "purpose"),
        ("conversations", [], {}, 422, "no file"),
        ("conversations", [("a.jsonl", b"{}\n")], {"tokenizer": "x" * 2000}, 422, "at most 1024 bytes"),
        ("conversations", [("a.jsonl", b"")], {}, 422, "a.jsonl is empty"),
        ("conversations", [("a.jsonl", b"{}\n"), ("b.jsonl", b"{}\n")], {}, 422, "one file"),
        ("pretrain", [("a.txt", b"text")], {"val_fraction": "0.9"}, 422, "val_fraction"),
        ("conversations", [("a.jsonl", b"{}\n")], {"tokenizer": "../../etc"}, 422, "tokenizer"),
        ("conversations", [("a.jsonl", b"{}\n")], {"path": "/etc/passwd"}, 422, "unknown field 'path'"),
    ],
)
def test_a_refused_upload_says_why_and_leaves_nothing(
    api: Stack, purpose: str | None, files: list, fields: dict, code: int, says: str
) -> None:
    with api.client() as client:
        response = upload(client, purpose, *files, **fields)
    assert response.status_code == code, response.text
    assert says in response.text
    assert leftovers(api) == [] and api.queue_length() == 0


def test_uploads_need_the_token(api: Stack) -> None:
    with api.client(token=None) as client:
        assert upload(client, "conversations", ("a.jsonl", jsonl(SHAREGPT))).status_code == 401
    with api.client(token="wrong-token-of-some-length") as client:
        assert client.delete("/files/file-0123456789abcdef01234567").status_code == 401
    assert leftovers(api) == []


def test_a_too_large_upload_is_cut_off_at_the_limit_and_leaves_nothing(api: Stack) -> None:
    def stream() -> Iterator[bytes]:  # no Content-Length: the limit must stop it mid-stream
        boundary = b"--b0undary"
        yield boundary + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\npretrain\r\n'
        yield boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n\r\n'
        for _ in range(UPLOAD_LIMIT // 100_000 + 1):
            yield b"words " * 16_667
        yield b"\r\n" + boundary + b"--\r\n"

    headers = {"Content-Type": "multipart/form-data; boundary=b0undary"}
    with api.client() as client:
        response = client.post("/files", content=stream(), headers=headers)
    assert response.status_code == 413
    assert leftovers(api) == []


def raw_upload(stack: Stack, body: bytes, declared: int) -> bytes:
    """POST /files by hand: `declared` bytes announced, `body` sent; the whole answer, when all that was
    announced was sent (else the client closes the connection at once)."""
    host, port = stack.api_url.removeprefix("http://").split(":")
    head = (
        f"POST /files HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {stack.token}\r\n"
        f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {declared}\r\n"
        "Connection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(head.encode() + body)
        if len(body) != declared:
            return b""
        answer = b""
        while chunk := connection.recv(65536):  # headers and body may come in separate writes
            answer += chunk
        return answer


PARTIAL = (
    b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nconversations\r\n'
    b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="c.jsonl"\r\n\r\n' + jsonl(SHAREGPT) * 50
)


def test_an_upload_cut_off_mid_stream_leaves_nothing(api: Stack) -> None:
    raw_upload(api, PARTIAL, declared=len(PARTIAL) + 10_000)  # the client goes away mid-body
    # the API notices the disconnect and removes what it had written (later on a loaded machine)
    wait_until(lambda: leftovers(api) == [], 30, "the cut-off upload to be removed")
    answer = raw_upload(api, PARTIAL, declared=len(PARTIAL))  # whole, but without its closing boundary
    assert answer.startswith(b"HTTP/1.1 400") and b"cut off mid-stream" in answer
    assert leftovers(api) == []


def test_a_file_is_validating_until_its_job_runs_and_jobs_naming_it_are_refused(api: Stack) -> None:
    with api.client() as client:
        created = upload(
            client, "conversations", ("my chats.jsonl", jsonl(SHAREGPT) * 4000), tokenizer="demo"
        )
        assert created.status_code == 201, created.text  # ~380 kB
        record = created.json()
        file_id = record["id"]
        assert record["status"] == "validating" and record["parts"][0]["name"] == "my chats.jsonl"
        assert leftovers(api) == [file_id]  # stored under our name
        stored = api.base_dir / "files" / file_id / record["parts"][0]["stored"]
        assert stored.name == "part-000.jsonl" and stored.read_bytes() == jsonl(SHAREGPT) * 4000
        job = client.get(f"/jobs/{record['job_id']}").json()
        assert (job["kind"], job["run"], job["config"]["file"]) == ("validate_file", "demo", file_id)
        assert [f["id"] for f in client.get("/files").json()] == [file_id]
        content = client.get(f"/files/{file_id}/content")
        assert (
            content.content == stored.read_bytes()
            and "my%20chats.jsonl" in content.headers["content-disposition"]
        )

        for kind, config in [
            ("chat_sft", {"mixture": file_id}),
            ("base_train", {"corpus": file_id}),
            ("pipeline", {"tokenizer": {"corpus": "file-ffffffffffffffffffffffff"}}),
        ]:
            refused = client.post("/jobs", json={"kind": kind, "run": "r", "config": config})
            assert refused.status_code == 409, refused.text
        assert (
            "is validating"
            in client.post("/jobs", json={"kind": "chat_rl", "config": {"questions": file_id}}).text
        )

        busy = client.delete(f"/files/{file_id}")
        assert busy.status_code == 409 and record["job_id"] in busy.json()["detail"]
        client.post(f"/jobs/{record['job_id']}/stop")  # never validated: invalid, with the reason
        stopped = client.get(f"/files/{file_id}").json()
        assert stopped["status"] == "invalid" and "validation job canceled" in stopped["error"]
        assert client.delete(f"/files/{file_id}").status_code == 204
        assert client.get(f"/files/{file_id}").status_code == 404
        assert client.get("/files/file-nope").status_code == 422
    assert leftovers(api) == []


# -- with a worker ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API and worker on a Redis of their own (the module's other stack has no worker)."""
    workdir = tmp_path_factory.mktemp("files-worker")
    with private_redis(workdir) as redis_url:
        yield from start_stack(redis_url, workdir, None, with_worker=True)


def ended(client: httpx.Client, path: str, field: str, pending: set[str], timeout: float = 120) -> dict:
    """The record at `path` once its `field` is no longer one of `pending`."""
    wait_until(lambda: client.get(path).json()[field] not in pending, timeout, f"{path} to finish")
    return client.get(path).json()


def test_a_broken_sharegpt_file_is_named_line_by_line_and_the_fixed_one_is_ready(worker_stack: Stack) -> None:
    unknown_role = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "?"}]}
    broken = jsonl(SHAREGPT, '{"conversations": [{"from": "human"', SHAREGPT, unknown_role)
    fixed = jsonl(*[SHAREGPT] * 10)
    with worker_stack.client() as client:
        bad = upload(client, "conversations", ("chats.jsonl", broken)).json()
        report = ended(client, f"/files/{bad['id']}", "status", {"validating"})
        assert report["status"] == "invalid" and report["problems_total"] == 2
        assert [(p["line"], p["reason"][:8]) for p in report["problems"]] == [
            (2, "bad JSON"),
            (4, "message "),
        ]
        assert "unknown role 'bot'" in report["problems"][1]["reason"]
        assert (
            client.post("/jobs", json={"kind": "chat_sft", "config": {"mixture": bad["id"]}}).status_code
            == 409
        )

        good = upload(client, "conversations", ("chats.jsonl", fixed), val_fraction="0.2").json()
        report = ended(client, f"/files/{good['id']}", "status", {"validating"})
        assert report["status"] == "ready", report
        assert report["stats"]["rows"] == 10 and report["stats"]["roles"]["assistant"] == 10
        assert (report["stats"]["train_rows"], report["stats"]["val_rows"]) == (8, 2)
        assert report["samples"][0]["messages"][0] == {"role": "user", "content": "What is 2+2?"}


def test_text_files_become_a_corpus_for_a_tokenizer_and_base_pretraining(worker_stack: Stack) -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "mu"]

    def chapter(n: int) -> bytes:  # 40 paragraphs of 60 words
        paragraphs = (" ".join(words[(n + i + j) % len(words)] for j in range(60)) for i in range(40))
        return "\n\n".join(paragraphs).encode()

    texts = [(f"chapter{n}.txt", chapter(n)) for n in range(3)]
    tiny = {"depth": 2, "max_seq_len": 64, "device_batch_size": 2, "total_batch_size": 256,
            "num_iterations": 3, "eval_tokens": 512, "eval_every": -1, "core_metric_every": -1,
            "sample_every": -1}  # fmt: skip
    with worker_stack.client() as client:
        corpus = upload(client, "pretrain", *texts, val_fraction="0.1").json()
        assert [p["name"] for p in corpus["parts"]] == ["chapter0.txt", "chapter1.txt", "chapter2.txt"]
        report = ended(client, f"/files/{corpus['id']}", "status", {"validating"})
        assert report["status"] == "ready" and report["stats"]["documents"] == 6  # 2 a chapter

        spec = {"kind": "pipeline", "run": "mine", "config": {
            "tokenizer": {"vocab_size": 300, "max_chars": 100_000, "corpus": corpus["id"]},
            "base_train": {**tiny, "corpus": corpus["id"]},
            "skip": ["chat_sft", "base_eval", "chat_eval"]}}  # fmt: skip
        pipeline = client.post("/jobs", json=spec).json()
        assert client.delete(f"/files/{corpus['id']}").status_code == 409  # in use
        done = ended(
            client, f"/jobs/{pipeline['id']}", "status", {"queued", "started", "waiting"}, timeout=300
        )
        stages = [client.get(f"/jobs/{i}").json() for i in done["stages"]]
        assert done["status"] == "finished", [s["error"] for s in stages]
        log = client.get(f"/jobs/{done['stages'][1]}/logs").text
        assert f"files/{corpus['id']}/data/pretrain" in log  # trained on the upload's shards
        assert "mine-base-000003" in [model["id"] for model in client.get("/models").json()]


def test_a_worker_of_cpu_jobs_validates_a_file_while_training_waits_for_another(tmp_path: Path) -> None:
    """What compose's cpu-worker and `make up`'s do: an upload is validated even while every other worker
    is busy training, and that worker never takes a training job."""
    with (
        private_redis(tmp_path) as redis_url,
        contextlib.contextmanager(start_stack)(redis_url, tmp_path, None, with_worker=False) as stack,
    ):
        cpu_worker = Process(
            "cpu-worker", [PYTHON, "-m", "worker"], stack.env | {"WORKER_QUEUES": "cpu"}, tmp_path
        )
        try:
            with stack.client() as client:
                training = client.post("/jobs", json={"kind": "base_train", "run": "busy", "config": {}})
                assert training.status_code == 201, training.text
                chats = upload(client, "conversations", ("chats.jsonl", jsonl(*[SHAREGPT] * 10))).json()
                report = ended(client, f"/files/{chats['id']}", "status", {"validating"}, timeout=60)
                assert report["status"] == "ready", report
                assert client.get(f"/jobs/{training.json()['id']}").json()["status"] == "queued"
                # GET /workers says why it waits: no worker takes the GPU queue. (RQ marks its worker idle
                # a moment after the job's record has ended.)
                idle = lambda: not client.get("/workers").json()["workers"][0]["busy"]  # noqa: E731
                wait_until(idle, 10, "the CPU worker to be idle")
                workers = client.get("/workers").json()
                assert [(w["queues"], w["busy"], w["job_id"]) for w in workers["workers"]] == [
                    (["cpu"], False, None)
                ]
                assert workers["queues"] == [
                    {"name": "gpu", "waiting": 1, "workers": 0},
                    {"name": "cpu", "waiting": 0, "workers": 1},
                ]
                assert stack.client(token=None).get("/workers").status_code == 401
        finally:
            cpu_worker.stop()
