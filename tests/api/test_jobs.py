"""Jobs end to end: API → Redis/RQ → worker → trainer program, all real processes."""

import json
import shutil
import time

import pytest
from jobs import queue, records
from jobs.queue import SERIALIZER
from jobs.records import JobRecord, JobStatus
from rq.exceptions import NoSuchJobError
from rq.job import Job

from trainer.tokenizer import SPECIAL_TOKENS, Tokenizer

from conftest import LEASE_SECONDS, Stack
from sse import read_events
from support import wait_until

TRAINING_CONFIG = {
    "depth": 2,
    "head_dim": 64,
    "max_seq_len": 128,
    "device_batch_size": 4,
    "total_batch_size": 512,
    "num_iterations": 5000,
    "eval_every": 0,
    "sample_every": 0,
    "save_every": 0,
}
TINY_TOKENIZER = {"kind": "tokenizer", "run": "e2e", "config": {"vocab_size": 1024, "max_chars": 2_000_000}}


def submit(stack: Stack, spec: dict) -> dict:
    with stack.client() as client:
        response = client.post("/jobs", json=spec)
    assert response.status_code == 201, response.text
    return response.json()


def follow_to_end(stack: Stack, job_id: str) -> list:
    with stack.client() as client:
        return read_events(client, f"/jobs/{job_id}/logs?follow=true")


@pytest.fixture(scope="module")
def finished_job(stack: Stack) -> dict:
    """One real tokenizer job, followed to its end through SSE."""
    job = submit(stack, TINY_TOKENIZER)
    events = follow_to_end(stack, job["id"])
    return {"submitted": job, "events": events}


def test_submit_returns_a_queued_job(finished_job: dict) -> None:
    job = finished_job["submitted"]
    assert job["status"] == "queued"
    assert job["kind"] == "tokenizer" and job["run"] == "e2e"
    assert job["config"] == {
        "vocab_size": 1024,
        "max_chars": 2_000_000,
        "doc_cap": 10_000,
        "corpus": None,
        "max_retries": 2,
        "time_limit": None,
    }


def test_following_the_log_streams_every_line_then_ends(stack: Stack, finished_job: dict) -> None:
    events = finished_job["events"]
    lines = [e.data for e in events if e.event == "message"]
    assert lines[0].startswith("$ python -m trainer.tok_train --run e2e --vocab-size 1024")
    assert "tokenizer trained:" in lines
    assert events[-1].event == "end" and json.loads(events[-1].data) == {"status": "finished"}
    # The stream carries exactly the stored log, line for line.
    with stack.client() as client:
        assert client.get(f"/jobs/{finished_job['submitted']['id']}/logs").text.splitlines() == lines


def test_finished_job_has_times_and_result(stack: Stack, finished_job: dict) -> None:
    with stack.client() as client:
        job = client.get(f"/jobs/{finished_job['submitted']['id']}").json()
    assert job["status"] == "finished" and job["error"] is None
    assert job["created_at"] <= job["started_at"] <= job["ended_at"]
    assert job["result"]["vocab_size"] == 1024
    assert job["result"]["chars_seen"] <= 2_000_000
    assert job["result"]["val_bytes_per_token"] == pytest.approx(2.587, abs=0.02)  # vocab 1024 on the kit


def test_job_trains_a_real_tokenizer(stack: Stack, finished_job: dict) -> None:
    tokenizer = Tokenizer.load(stack.base_dir / "runs" / "e2e" / "tokenizer")
    text = "Grüße, 世界! 🚀 naïve café — x = [1, 22, 333]\n\tdef f(): return 'ok'"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    specials = tokenizer.special_tokens
    assert list(specials) == SPECIAL_TOKENS and len(specials) == 9
    assert all(0 <= i < tokenizer.vocab_size == 1024 for i in specials.values())
    log_file = stack.base_dir / "runs" / "e2e" / "logs" / f"{finished_job['submitted']['id']}.log"
    assert "tokenizer trained:" in log_file.read_text()


def test_reconnecting_client_resumes_after_last_event_id(stack: Stack, finished_job: dict) -> None:
    lines = [e for e in finished_job["events"] if e.event == "message"]
    with stack.client() as client:
        resumed = read_events(
            client,
            f"/jobs/{finished_job['submitted']['id']}/logs?follow=true",
            headers={"Last-Event-ID": lines[2].id},
        )
    assert [e.data for e in resumed if e.event == "message"] == [e.data for e in lines[3:]]


def test_job_record_outlives_rqs_own_job_data(stack: Stack, finished_job: dict) -> None:
    job_id = finished_job["submitted"]["id"]
    record = stack.client().get(f"/jobs/{job_id}").json()
    Job.fetch(record["rq_job_id"], connection=stack.redis, serializer=SERIALIZER).delete()  # as its TTL does
    with pytest.raises(NoSuchJobError):
        Job.fetch(
            record["rq_job_id"], connection=stack.redis, serializer=SERIALIZER
        )  # RQ has forgotten it ...
    with stack.client() as client:  # ... our record and log have not
        assert client.get(f"/jobs/{job_id}").json()["status"] == "finished"
        assert "tokenizer trained:" in client.get(f"/jobs/{job_id}/logs").text


def test_a_job_this_version_cannot_run_fails_once_with_the_reason(stack: Stack, finished_job: dict) -> None:
    """A record from an older version whose config no longer validates is failed by the worker that takes
    it, not left queued for the reaper to put back again and again."""
    record = JobRecord.new("base_train", "old", {"a_field_since_removed": 1}, JobStatus.QUEUED)
    record = record.model_copy(update={"rq_job_id": queue.rq_job_id(record.id, 1)})
    with stack.redis.pipeline() as pipe:  # stored and queued as the older version did
        pipe.multi()
        records.add(pipe, record)
        queue.put_on_queue(stack.redis, pipe, record)
        pipe.execute()
    with stack.client() as client:
        status = lambda: client.get(f"/jobs/{record.id}").json()["status"]  # noqa: E731
        wait_until(lambda: status() == "failed", 60, "the job to fail")
        error = client.get(f"/jobs/{record.id}").json()["error"]
        assert error.startswith("cannot start: ValidationError") and "a_field_since_removed" in error
        time.sleep(3 * LEASE_SECONDS)  # a few reaper rounds
        assert status() == "failed"


def test_failing_program_marks_job_failed_and_worker_survives(stack: Stack, finished_job: dict) -> None:
    # A file where the run's report folder should be makes the program crash at its end.
    run_dir = stack.base_dir / "runs" / "broken"
    run_dir.mkdir(parents=True)
    (run_dir / "report").write_text("not a folder")
    job = submit(stack, {**TINY_TOKENIZER, "run": "broken"})
    events = follow_to_end(stack, job["id"])
    assert json.loads(events[-1].data) == {"status": "failed"}
    with stack.client() as client:
        record = client.get(f"/jobs/{job['id']}").json()
    assert record["error"].startswith("trainer.tok_train exited with code 1:")
    assert "FileExistsError" in record["error"]
    # The same worker still takes jobs.
    again = submit(stack, {**TINY_TOKENIZER, "run": "after-crash"})
    assert json.loads(follow_to_end(stack, again["id"])[-1].data) == {"status": "finished"}


def test_a_trainer_folder_in_the_data_volume_does_not_shadow_the_trainer(
    stack: Stack, finished_job: dict
) -> None:
    """A job's working directory is the base dir, which the api and inference services can write too: a
    `trainer/` package put there must not be imported in place of the real one."""
    shadow, marker = stack.base_dir / "trainer", stack.workdir / "shadow-ran"
    shadow.mkdir()
    (shadow / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    try:
        job = submit(stack, {**TINY_TOKENIZER, "run": "shadowed"})
        assert json.loads(follow_to_end(stack, job["id"])[-1].data) == {"status": "finished"}
    finally:
        shutil.rmtree(shadow)
    assert not marker.exists()


def test_jobs_are_listed_newest_first_filtered_and_paged(stack: Stack, finished_job: dict) -> None:
    with stack.client() as client:
        page = client.get("/jobs").json()
        jobs = page["jobs"]
        assert len(jobs) >= 2 and page["total"] == len(jobs)
        assert [j["created_at"] for j in jobs] == sorted((j["created_at"] for j in jobs), reverse=True)
        assert client.get("/jobs", params={"limit": 1}).json()["jobs"] == jobs[:1]
        assert client.get("/jobs", params={"limit": 1, "offset": 1}).json()["jobs"] == jobs[1:2]
        finished = client.get(
            "/jobs", params={"status": "finished", "kind": "tokenizer", "run": "e2e"}
        ).json()
        assert finished["total"] >= 1
        assert all(j["status"] == "finished" and j["run"] == "e2e" for j in finished["jobs"])
        assert client.get("/jobs", params={"run": "no-such-run"}).json() == {
            "jobs": [],
            "total": 0,
            "offset": 0,
            "limit": 50,
        }
        assert client.get("/jobs", params={"offset": 10**12}).status_code == 422  # bounded, never a 500
        assert client.get("/jobs", params={"status": "sleeping"}).status_code == 422


def test_logs_page_and_tail(stack: Stack, finished_job: dict) -> None:
    job_id = finished_job["submitted"]["id"]
    lines = [e.data for e in finished_job["events"] if e.event == "message"]
    with stack.client() as client:
        whole = client.get(f"/jobs/{job_id}/logs")
        assert whole.headers["x-log-lines"] == str(len(lines))
        assert (
            client.get(f"/jobs/{job_id}/logs", params={"offset": 2, "limit": 3}).text.splitlines()
            == lines[2:5]
        )
        assert client.get(f"/jobs/{job_id}/logs", params={"tail": 2}).text.splitlines() == lines[-2:]
        assert client.get(f"/jobs/{job_id}/logs", params={"limit": 10**9}).status_code == 422


def test_a_malformed_last_event_id_is_a_400_a_malformed_after_a_422(stack: Stack, finished_job: dict) -> None:
    job_id = finished_job["submitted"]["id"]
    with stack.client() as client:
        for path in ("logs", "metrics"):
            response = client.get(
                f"/jobs/{job_id}/{path}?follow=true", headers={"Last-Event-ID": "'; FLUSHALL"}
            )
            assert response.status_code == 400 and "Last-Event-ID" in response.json()["detail"]

        # ASCII digits only, each part within Redis's 64 bits, and not the last id (nothing comes after it)
        for after in (
            "'; FLUSHALL",
            "١٢-٠",
            "99999999999999999999-0",
            "18446744073709551615-18446744073709551615",
        ):
            assert client.get(f"/jobs/{job_id}/metrics", params={"after": after}).status_code == 422
            if after.isascii():
                follow = client.get(f"/jobs/{job_id}/metrics?follow=true", headers={"Last-Event-ID": after})
                assert follow.status_code == 400
        assert client.get(f"/jobs/{job_id}/metrics", params={"after": "18446744073709551615-0"}).json() == []


def test_health_reports_redis(stack: Stack) -> None:
    with stack.client() as client:
        assert client.get("/health").json() == {"status": "ok", "redis": "ok"}


def test_stopping_a_training_job_checkpoints_and_retry_resumes_it(stack: Stack, finished_job: dict) -> None:
    # Run "e2e" has the tokenizer from the finished job; train on it long enough to cancel mid-run.
    spec = {
        "kind": "base_train",
        "run": "e2e",
        "config": TRAINING_CONFIG,
    }
    job = submit(stack, spec)
    with stack.client() as client:
        wait_until(
            lambda: "step 3/5000 | loss" in client.get(f"/jobs/{job['id']}/logs").text, 120, "training steps"
        )
        (worker,) = client.get("/workers").json()["workers"]  # the stack's one worker: on this job
        assert (worker["busy"], worker["job_id"], worker["queues"]) == (True, job["id"], ["gpu", "cpu"])
    with stack.client() as client:
        assert client.post(f"/jobs/{job['id']}/stop").json()["stop_requested"] is True
    events = follow_to_end(stack, job["id"])
    assert json.loads(events[-1].data) == {"status": "stopped"}
    lines = [e.data for e in events if e.event == "message"]
    assert (
        lines[0].startswith("$ python -m trainer.base_train --run e2e ")
        and "--depth 2 --head-dim 64" in lines[0]
    )
    assert "stopping the program (SIGTERM): stopped on request" in lines
    assert any("checkpoint" in line and "step_" in line for line in lines)
    checkpoints = sorted((stack.base_dir / "runs" / "e2e" / "base").glob("step_*"))
    assert checkpoints and (checkpoints[-1] / "model.safetensors").exists()
    stopped_at = int(checkpoints[-1].name.removeprefix("step_"))
    with stack.client() as client:
        record = client.get(f"/jobs/{job['id']}").json()
        assert (
            record["error"] == "stopped on request"
            and record["attempts"][0]["end_reason"] == "stopped on request"
        )
        assert record["progress"]["step"] >= 3 and 0 < record["progress"]["percent"] < 100
        points = client.get(f"/jobs/{job['id']}/metrics").json()
        assert [p["values"]["step"] for p in points if "loss" in p["values"]][:3] == [1, 2, 3]
        newer = client.get(f"/jobs/{job['id']}/metrics", params={"after": points[1]["id"]}).json()
        assert newer == points[2:]
        # A retry continues from the checkpoint the stop wrote.
        retried = client.post(f"/jobs/{job['id']}/retry")
        assert retried.status_code == 200 and retried.json()["status"] == "queued"
        assert client.post(f"/jobs/{job['id']}/retry").status_code == 409  # already queued
        wait_until(
            lambda: client.get(f"/jobs/{job['id']}").json()["progress"]["step"] > stopped_at,
            120,
            "resumed training",
        )
        record = client.get(f"/jobs/{job['id']}").json()
        assert record["attempts"][1]["resumed_from_step"] == stopped_at
        assert "--resume" in client.get(f"/jobs/{job['id']}/logs", params={"tail": 100000}).text
        assert client.post(f"/jobs/{job['id']}/stop").status_code == 200
    events = follow_to_end(stack, job["id"])
    assert json.loads(events[-1].data) == {"status": "stopped"}


def test_a_job_past_its_time_limit_is_stopped_with_a_checkpoint(stack: Stack, finished_job: dict) -> None:
    config = {**TRAINING_CONFIG, "num_iterations": 100_000, "time_limit": 10}
    job = submit(stack, {"kind": "base_train", "run": "e2e", "config": config})
    events = follow_to_end(stack, job["id"])
    assert json.loads(events[-1].data) == {"status": "stopped"}
    with stack.client() as client:
        record = client.get(f"/jobs/{job['id']}").json()
    assert record["error"] == "time limit of 10 s reached"
    assert "stopping the program (SIGTERM): time limit of 10 s reached" in [e.data for e in events]
    assert any("checkpoint" in e.data and "step_" in e.data for e in events)
