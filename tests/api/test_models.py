"""Models in and out through the API: an export job and its tarball's download (resumable with Range),
an import job; every refusal first (no worker: jobs stay queued), then the whole way with a worker."""

import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from jobs.records import JOBS_INDEX

from tests.inference.conftest import tiny_tokenizer, write_checkpoint

from conftest import Stack, start_stack
from support import wait_until

MODEL = "m-sft-000007"  # a checkpoint of run m (api_only's runs folder)
IMPORT = {"source": "runs/m/exports/m-sft-000007", "run": "imported"}


@pytest.fixture(scope="module")
def with_model(api_only: Stack) -> Stack:
    write_checkpoint(api_only.base_dir / "runs", "m", "sft", 7, seed=7)
    (api_only.base_dir / "runs" / "m" / "tokenizer").mkdir()
    return api_only


def stop_all(stack: Stack, client: httpx.Client) -> None:
    for job in client.get("/jobs", params={"limit": 500}).json()["jobs"]:
        if job["status"] in ("queued", "waiting", "started"):
            client.post(f"/jobs/{job['id']}/stop")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"source": "/etc/passwd"}, "source"),  # absolute
        ({"source": "../outside"}, "source"),
        ({"source": "runs/../../outside"}, "source"),
        ({"source": "-owner/name"}, "source"),  # would read as a flag
        ({"source": "owner/na me"}, "source"),
        ({"source": "owner//name"}, "source"),
        ({"source": "owner/"}, "source"),
        ({"source": "https://huggingface.co/owner/name"}, "source"),
        ({"source": "x" * 401}, "source"),
        ({"source": ""}, "source"),
        ({"revision": "main; rm -rf /"}, "revision"),
        ({"revision": "-x"}, "revision"),
        ({"revision": "r" * 129}, "revision"),
        ({"stage": "final"}, "stage"),
        ({"model_tag": "../d20"}, "model_tag"),
        ({"step": -1}, "step"),
        ({"run": "../../etc"}, "run"),
        ({"run": None}, "run"),
        ({"format": "gguf"}, "format"),  # an export's field, not an import's
    ],
)
def test_a_bad_import_is_422_naming_the_field_and_queues_nothing(
    with_model: Stack, change: dict, field: str
) -> None:
    jobs_before = with_model.redis.zcard(JOBS_INDEX)
    body = {k: v for k, v in {**IMPORT, **change}.items() if v is not None}
    with with_model.client() as client:
        response = client.post("/models/import", json=body)
    assert response.status_code == 422, response.text
    assert any(field in map(str, e["loc"]) for e in response.json()["detail"]), response.json()
    assert with_model.queue_length() == 0 and with_model.redis.zcard(JOBS_INDEX) == jobs_before


def test_an_absolute_or_climbing_source_is_refused_with_the_reason(with_model: Stack) -> None:
    with with_model.client() as client:
        for source in ("/data/model", "runs/../../etc"):
            detail = client.post("/models/import", json={**IMPORT, "source": source}).json()["detail"]
            assert "inside the base dir" in detail[0]["msg"], detail


def test_the_new_routes_refuse_a_missing_or_wrong_token(with_model: Stack) -> None:
    for token in (None, "wrong-token-wrong-token"):
        with with_model.client(token=token) as client:
            assert client.post(f"/models/{MODEL}/export").status_code == 401
            assert client.post("/models/import", json=IMPORT).status_code == 401
            assert client.get(f"/models/{MODEL}/download").status_code == 401
            assert client.delete(f"/models/{MODEL}/export").status_code == 401
    assert with_model.queue_length() == 0


def test_unknown_and_malformed_model_ids(with_model: Stack) -> None:
    with with_model.client() as client:
        for method, suffix in [("POST", "export"), ("GET", "download"), ("DELETE", "export")]:
            assert client.request(method, f"/models/nope/{suffix}").status_code == 422
            assert client.request(method, f"/models/m-final-000007/{suffix}").status_code == 422
            assert client.request(method, f"/models/m-sft-٠٠٠٠٠٧/{suffix}").status_code == 422  # ASCII only
            assert client.request(method, f"/models/..%2F..%2Fetc-sft-000001/{suffix}").status_code in (
                404,
                422,
            )
        missing = client.post("/models/m-sft-000008/export")
        assert missing.status_code == 404 and "does not exist" in missing.json()["detail"]
    assert with_model.queue_length() == 0


def test_a_model_not_exported_yet_is_a_404_that_says_how_to_export_it(with_model: Stack) -> None:
    with with_model.client() as client:
        assert client.get(f"/models/{MODEL}").json()["exported"] is False
        response = client.get(f"/models/{MODEL}/download")
    assert response.status_code == 404
    assert "not exported yet: POST /jobs with kind export, or POST /models/" in response.json()["detail"]


def test_export_queues_a_job_of_that_checkpoint_one_export_of_a_run_at_a_time(with_model: Stack) -> None:
    with with_model.client() as client:
        training = client.post("/jobs", json={"kind": "chat_sft", "run": "m"})
        assert training.status_code == 201  # an export only reads the checkpoint: training may go on
        response = client.post(f"/models/{MODEL}/export")
        assert response.status_code == 201, response.text
        job = response.json()
        assert (job["kind"], job["run"], job["status"]) == ("export", "m", "queued")
        config = {"stage": "sft", "step": 7, "format": "hf", "max_retries": 2, "time_limit": None}
        assert job["config"] == config
        again = client.post(f"/models/{MODEL}/export")
        assert again.status_code == 409 and job["id"] in again.json()["detail"]
        stop_all(with_model, client)
    assert with_model.queue_length() == 0


def test_import_queues_a_job_and_refuses_a_second_writer_of_the_stage_or_the_tokenizer(
    with_model: Stack,
) -> None:
    with with_model.client() as client:
        response = client.post("/models/import", json={**IMPORT, "revision": "main", "stage": "mid"})
        assert response.status_code == 201, response.text
        job = response.json()
        assert (job["kind"], job["run"], job["status"]) == ("import", "imported", "queued")
        assert job["config"]["source"] == IMPORT["source"] and job["config"]["stage"] == "mid"
        assert job["config"]["revision"] == "main"
        same_stage = client.post("/jobs", json={"kind": "mid_train", "run": "imported"})
        assert same_stage.status_code == 409 and job["id"] in same_stage.json()["detail"]
        tokenizer = client.post("/jobs", json={"kind": "tokenizer", "run": "imported"})
        assert tokenizer.status_code == 409  # the import brings the run's tokenizer
        assert client.post("/jobs", json={"kind": "base_eval", "run": "imported"}).status_code == 201
        stop_all(with_model, client)
        hub = client.post("/models/import", json={"source": "karpathy/nanochat-d32", "run": "hub"})
        assert hub.status_code == 201 and hub.json()["config"]["stage"] == "sft"  # the default
        stop_all(with_model, client)
    assert with_model.queue_length() == 0


def test_a_tarball_is_downloaded_whole_or_from_a_byte_on(with_model: Stack) -> None:
    exports = with_model.base_dir / "runs" / "m" / "exports"
    exports.mkdir(exist_ok=True)
    content = bytes(range(256)) * 40
    (exports / f"{MODEL}.tar").write_bytes(content)
    try:
        with with_model.client() as client:
            assert client.get(f"/models/{MODEL}").json()["exported"] is True
            whole = client.get(f"/models/{MODEL}/download")
            assert whole.status_code == 200 and whole.content == content
            assert whole.headers["content-type"] == "application/x-tar"
            assert whole.headers["content-disposition"] == f'attachment; filename="{MODEL}.tar"'
            assert whole.headers["accept-ranges"] == "bytes"
            rest = client.get(f"/models/{MODEL}/download", headers={"Range": "bytes=10-"})
            assert rest.status_code == 206 and rest.content == content[10:]
            assert rest.headers["content-range"] == f"bytes 10-{len(content) - 1}/{len(content)}"
            # a cut download resumed where it stopped gives the whole file
            with client.stream("GET", f"/models/{MODEL}/download") as cut:
                first = next(cut.iter_bytes(4096))
            resumed = client.get(f"/models/{MODEL}/download", headers={"Range": f"bytes={len(first)}-"})
            assert first + resumed.content == content
            # If-Range: the rest only while the tarball is the one the first part came from
            etag = whole.headers["etag"]
            same = client.get(f"/models/{MODEL}/download", headers={"Range": "bytes=5-", "If-Range": etag})
            assert same.status_code == 206 and same.content == content[5:]
            stale = client.get(f"/models/{MODEL}/download", headers={"Range": "bytes=5-", "If-Range": '"x"'})
            assert stale.status_code == 200 and stale.content == content
            beyond = client.get(f"/models/{MODEL}/download", headers={"Range": f"bytes={len(content)}-"})
            assert beyond.status_code == 416
            assert beyond.headers["content-range"] == f"bytes */{len(content)}"
    finally:
        (exports / f"{MODEL}.tar").unlink()


def fake_export(stack: Stack) -> tuple[Path, Path]:
    """MODEL's export as trainer.export leaves it: a Hugging Face folder and its tarball beside it."""
    exports = stack.base_dir / "runs" / "m" / "exports"
    (exports / MODEL).mkdir(parents=True, exist_ok=True)
    (exports / MODEL / "config.json").write_text("{}")
    (exports / f"{MODEL}.tar").write_bytes(b"tar")
    return exports / MODEL, exports / f"{MODEL}.tar"


def test_deleting_an_export_frees_its_folder_and_tarball_and_keeps_the_checkpoint(with_model: Stack) -> None:
    folder, tarball = fake_export(with_model)
    stopped = [
        folder.parent / f".{MODEL}.tar.tmp",
        folder.parent / f".{MODEL}.tmp-x1y2",
    ]  # an export cut short
    stopped[0].write_bytes(b"half a tarball")
    stopped[1].mkdir()
    with with_model.client() as client:
        assert client.get(f"/models/{MODEL}").json()["exported"] is True
        assert client.delete(f"/models/{MODEL}/export").status_code == 204
        assert not folder.exists() and not tarball.exists() and not any(p.exists() for p in stopped)
        assert client.get(f"/models/{MODEL}").json()["exported"] is False  # the checkpoint is still there
        assert client.get(f"/models/{MODEL}/download").status_code == 404
        again = client.delete(f"/models/{MODEL}/export")
        assert again.status_code == 404 and again.json()["detail"] == f"{MODEL} has no export"


def test_an_export_outlives_its_checkpoint_until_it_is_deleted(with_model: Stack) -> None:
    exports = with_model.base_dir / "runs" / "gone" / "exports"
    exports.mkdir(parents=True)
    (exports / ".gone-sft-000001.tar.tmp").write_bytes(b"all that a stopped export left")
    with with_model.client() as client:
        assert client.get("/models/gone-sft-000001").status_code == 404  # no such checkpoint
        assert client.delete("/models/gone-sft-000001/export").status_code == 204
    assert list(exports.iterdir()) == []


def test_exports_are_listed_newest_first_those_of_deleted_checkpoints_too(with_model: Stack) -> None:
    folder, tarball = fake_export(with_model)
    orphan = with_model.base_dir / "runs" / "gone" / "exports" / "gone-sft-000002.tar"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x" * 1000)
    os.utime(tarball, (1_700_000_000, 1_700_000_000))  # the orphan is the newer
    (folder.parent / f".{MODEL}.tar.tmp").write_bytes(b"half")  # an export under way: not listed
    (folder.parent / "other-sft-000001.tar").write_bytes(b"?")  # not an export of run m
    odd = with_model.base_dir / "runs" / "odd name" / "exports" / "odd name-sft-000001.tar"
    odd.parent.mkdir(parents=True)
    odd.write_bytes(b"?")  # no run the API names: it could not be downloaded or deleted by its id
    with with_model.client() as client:
        try:
            listed = client.get("/models/exports")
            assert listed.status_code == 200, listed.text
            assert listed.json() == [
                {"id": "gone-sft-000002", "run": "gone", "stage": "sft", "step": 2, "bytes": 1000,
                 "created": int(orphan.stat().st_mtime), "checkpoint": False},
                {"id": MODEL, "run": "m", "stage": "sft", "step": 7, "bytes": 3, "created": 1_700_000_000,
                 "checkpoint": True},
            ]  # fmt: skip
            assert client.get(f"/models/{listed.json()[0]['id']}/download").content == b"x" * 1000
            assert with_model.client(token=None).get("/models/exports").status_code == 401
            assert client.delete("/models/gone-sft-000002/export").status_code == 204
            assert [e["id"] for e in client.get("/models/exports").json()] == [MODEL]
        finally:
            for path in (
                tarball,
                folder.parent / f".{MODEL}.tar.tmp",
                folder.parent / "other-sft-000001.tar",
            ):
                path.unlink(missing_ok=True)
            shutil.rmtree(folder, ignore_errors=True)
            for run in ("gone", "odd name"):
                shutil.rmtree(with_model.base_dir / "runs" / run, ignore_errors=True)


def test_an_export_that_a_job_may_write_or_read_is_not_deleted(with_model: Stack) -> None:
    folder, tarball = fake_export(with_model)
    with with_model.client() as client:
        try:
            for start in (
                lambda: client.post(f"/models/{MODEL}/export"),  # would write it again
                lambda: client.post("/models/import", json=IMPORT),  # reads it
                lambda: client.post("/models/import", json={**IMPORT, "source": f"{IMPORT['source']}/."}),
            ):
                job = start().json()
                refused = client.delete(f"/models/{MODEL}/export")
                assert refused.status_code == 409 and job["id"] in refused.json()["detail"], refused.text
                assert folder.is_dir() and tarball.is_file()
                stop_all(with_model, client)
            elsewhere = client.post("/models/import", json={**IMPORT, "source": "runs/m/exports/another"})
            assert elsewhere.status_code == 201  # an import of another folder: no reason to refuse
            assert client.delete(f"/models/{MODEL}/export").status_code == 204
        finally:
            stop_all(with_model, client)
    assert with_model.queue_length() == 0


def test_openapi_documents_the_new_routes_statuses(with_model: Stack) -> None:
    with with_model.client() as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert {"200", "206", "401", "404", "416", "422", "503"} <= set(
        paths["/models/{model_id}/download"]["get"]["responses"]
    )
    assert {"201", "401", "404", "409", "422", "503"} <= set(
        paths["/models/{model_id}/export"]["post"]["responses"]
    )
    assert {"201", "401", "409", "422", "503"} <= set(paths["/models/import"]["post"]["responses"])
    assert {"204", "401", "404", "409", "422", "503"} <= set(
        paths["/models/{model_id}/export"]["delete"]["responses"]
    )
    assert {"200", "401", "503"} <= set(paths["/models/exports"]["get"]["responses"])


# The whole way, with a worker and the trainer's programs: export, download, import, listed.


@pytest.fixture(scope="module")
def worker_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A worker too, and run `tiny`: a tokenizer and an sft checkpoint in the trainer's layout."""
    workdir = tmp_path_factory.mktemp("models")
    runs = workdir / "base" / "runs"
    tiny_tokenizer().save(runs / "tiny" / "tokenizer")
    write_checkpoint(runs, "tiny", "sft", 10, seed=10)
    yield from start_stack(redis_url, workdir, None, with_worker=True)


def finished(stack: Stack, job: dict, timeout: float = 300) -> dict:
    with stack.client() as client:
        ended = lambda: client.get(f"/jobs/{job['id']}").json()["status"] not in ("queued", "started")  # noqa: E731
        wait_until(ended, timeout, f"{job['kind']} job {job['id']}")
        record = client.get(f"/jobs/{job['id']}").json()
        log = client.get(f"/jobs/{job['id']}/logs", params={"tail": 30}).text
    assert record["status"] == "finished", f"{record['error']}\n{log}"
    return record


def test_a_model_is_exported_downloaded_in_two_parts_and_imported_into_a_new_run(worker_stack: Stack) -> None:
    model = "tiny-sft-000010"
    with worker_stack.client() as client:
        export = client.post(f"/models/{model}/export")
        assert export.status_code == 201, export.text
        result = finished(worker_stack, export.json())["result"]
        assert result["format"] == "hf" and result["tarball_bytes"] > 0
        assert client.get(f"/models/{model}").json()["exported"] is True

        first = client.get(f"/models/{model}/download", headers={"Range": "bytes=0-999"})
        assert first.status_code == 206 and len(first.content) == 1000
        rest = client.get(f"/models/{model}/download", headers={"Range": "bytes=1000-"})
        assert rest.status_code == 206
        tarball = first.content + rest.content
        assert len(tarball) == result["tarball_bytes"]
        with tarfile.open(fileobj=io.BytesIO(tarball)) as archive:
            names = set(archive.getnames())
        assert {f"{model}/config.json", f"{model}/model.safetensors"} <= names
        assert {name.split("/")[0] for name in names} == {model}

        imported = client.post(
            "/models/import", json={"source": f"runs/tiny/exports/{model}", "run": "again"}
        )
        assert imported.status_code == 201, imported.text
        finished(worker_stack, imported.json())
        ids = [m["id"] for m in client.get("/models").json()]
    assert any(i.startswith("again-sft-") for i in ids), ids
    assert Path(worker_stack.base_dir / "runs" / "again" / "tokenizer").is_dir()
