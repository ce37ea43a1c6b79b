"""Tiny pipelines of both recipes through the API, all real processes. The classic one (tokenizer → base →
mid → sft → rl → evals) is stopped in base training on the way (later stages are canceled, no process is
left), then retried: it resumes from its checkpoint and runs to the end. The current one (tokenizer →
base → sft from base → chat eval) runs straight through."""

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_worker_loss import process_with

from conftest import Stack, start_stack
from sse import read_events
from support import wait_until

CHAT = {"eval_tokens": 1024, "chatcore_every": -1, "eval_every": 0, "mixture": "small.yaml"}
TOKENIZER = {"vocab_size": 1024, "max_chars": 2_000_000}
BASE = {
    "depth": 2, "head_dim": 64, "max_seq_len": 128, "device_batch_size": 4, "total_batch_size": 512,
    "eval_every": 0, "eval_tokens": 2048, "sample_every": 0, "core_metric_every": -1, "dtype": "float32",
}  # fmt: skip
PIPELINE = {
    "kind": "pipeline",
    "run": "pipe",
    "config": {
        "recipe": "classic",
        "tokenizer": TOKENIZER,
        "base_train": {**BASE, "num_iterations": 40, "save_every": 5},
        "mid_train": {**CHAT, "num_iterations": 2},
        "chat_sft": CHAT,  # one pass: 250 conversations // 32 a step = 7 steps
        "chat_rl": {
            "examples_per_step": 2, "num_samples": 4, "device_batch_size": 2, "max_new_tokens": 12,
            "eval_every": 2, "eval_examples": 2, "num_iterations": 2,
        },
        "base_eval": {"eval": "bpb", "split_tokens": 2048, "device_batch_size": 4},
        "chat_eval": {
            "source": "rl", "task_name": "ARC-Easy|SpellingBee", "max_problems": 2, "max_new_tokens": 8,
        },
    },
}  # fmt: skip
STAGES = ["tokenizer", "base_train", "mid_train", "chat_sft", "chat_rl", "base_eval", "chat_eval"]


@pytest.fixture(scope="module")
def pipe_stack(redis_url: str, data_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack_iter = start_stack(redis_url, tmp_path_factory.mktemp("pipe"), data_kit, with_worker=True)
    stack = next(stack_iter)
    stack.base_dir.mkdir(parents=True, exist_ok=True)
    (stack.base_dir / "small.yaml").write_text(  # a quick mixture, relative to the base dir
        "train:\n"
        "  - {source: smoltalk, split: train, rows: 100}\n"
        "  - {source: gsm8k, split: train, rows: 100}\n"
        "  - {source: identity-template, rows: 50}\n"
        "val:\n"
        "  - {source: smoltalk, split: test, rows: 20}\n"
    )
    yield stack
    next(stack_iter, None)
    for pid in process_with("--run", "pipe"):
        os.kill(pid, signal.SIGKILL)


def test_a_pipeline_stopped_in_base_training_and_retried_runs_to_the_end(pipe_stack: Stack) -> None:
    with pipe_stack.client() as client:
        pipeline = client.post("/jobs", json=PIPELINE)
        assert pipeline.status_code == 201, pipeline.text
        pipeline = pipeline.json()
        assert pipeline["kind"] == "pipeline" and len(pipeline["stages"]) == 7
        stages = {
            s["kind"]: s
            for s in client.get("/jobs", params={"run": "pipe"}).json()["jobs"]
            if s["pipeline_id"]
        }
        assert set(stages) == set(STAGES)
        assert all(stages[k]["status"] == "waiting" for k in STAGES[1:])
        assert client.post("/jobs", json={**PIPELINE, "kind": "base_train", "config": {}}).status_code == 409
        base_id = stages["base_train"]["id"]

        # Stop it during base training.
        wait_until(
            lambda: client.get(f"/jobs/{base_id}").json()["progress"].get("step", 0) >= 8, 180, "base steps"
        )
        assert client.post(f"/jobs/{pipeline['id']}/stop").status_code == 200
        wait_until(
            lambda: client.get(f"/jobs/{pipeline['id']}").json()["status"] == "stopped", 60, "the stop"
        )
        assert not process_with("--run", "pipe")  # nothing of the job is left running
        base = client.get(f"/jobs/{base_id}").json()
        assert base["status"] == "stopped"
        for kind in STAGES[2:]:
            stage = client.get(f"/jobs/{stages[kind]['id']}").json()
            assert stage["status"] == "canceled" and stage["error"] == "the pipeline was stopped"
            assert stage["attempts"] == []  # never ran
        refused = client.post(f"/jobs/{stages['chat_sft']['id']}/retry")  # a later stage alone: no
        assert refused.status_code == 409 and "base_train" in refused.json()["detail"]
        stopped_at = max(
            int(p.name[5:]) for p in (pipe_stack.base_dir / "runs" / "pipe" / "base").glob("step_*")
        )

        # Retry: base resumes from its checkpoint, then every later stage runs.
        assert client.post(f"/jobs/{pipeline['id']}/retry").status_code == 200
        with pipe_stack.client() as follower:
            events = read_events(follower, f"/jobs/{base_id}/logs?follow=true")
        assert json.loads(events[-1].data) == {"status": "finished"}
        wait_until(
            lambda: (
                client.get(f"/jobs/{pipeline['id']}").json()["status"] in ("finished", "failed", "canceled")
            ),
            480,
            "the pipeline",
        )
        pipeline = client.get(f"/jobs/{pipeline['id']}").json()
        assert pipeline["status"] == "finished", pipeline
        assert pipeline["progress"]["stages_finished"] == 7 and pipeline["progress"]["percent"] == 100
        base = client.get(f"/jobs/{base_id}").json()
        assert [a["end_reason"] for a in base["attempts"]] == ["stopped on request", "finished"]
        assert base["attempts"][1]["resumed_from_step"] == stopped_at
        assert base["result"]["steps"] == 40
        sft = client.get(f"/jobs/{stages['chat_sft']['id']}").json()["result"]
        assert (sft["recipe"], sft["source"], sft["steps"]) == ("classic", "pipe/mid step 2", 250 // 32)
        for kind in STAGES:
            stage = client.get(f"/jobs/{stages[kind]['id']}").json()
            assert stage["status"] == "finished" and stage["result"], kind
        for kind in ("base_train", "mid_train", "chat_sft", "chat_rl"):  # each training stage fed its metrics
            points = client.get(f"/jobs/{stages[kind]['id']}/metrics").json()
            progress = [p["values"]["progress"] for p in points if "progress" in p["values"]]
            assert progress and progress[-1] == pytest.approx(1.0, abs=0.05), kind
        assert client.delete(f"/jobs/{base_id}").status_code == 409  # a stage goes with its pipeline
        assert client.delete(f"/jobs/{pipeline['id']}").status_code == 204
        assert client.get(f"/jobs/{base_id}").status_code == 404
    report = pipe_stack.base_dir / "runs" / "pipe" / "report"
    assert {"base_train.json", "chat_rl.json", "base_eval.json", "chat_eval_rl.json"} <= {
        p.name for p in report.iterdir()
    }
    assert (pipe_stack.base_dir / "runs" / "pipe" / "rl").is_dir()  # the checkpoints stay


def test_the_current_recipe_runs_tokenizer_base_sft_and_the_chat_eval(pipe_stack: Stack) -> None:
    spec = {
        "kind": "pipeline",
        "run": "now",
        "config": {
            "tokenizer": TOKENIZER,
            "base_train": {**BASE, "num_iterations": 4},
            "chat_sft": {**CHAT, "num_iterations": 2},
            "skip": ["base_eval"],
            "chat_eval": {"source": "sft", "task_name": "ARC-Easy", "max_problems": 2},
        },
    }
    with pipe_stack.client() as client:
        pipeline = client.post("/jobs", json=spec)
        assert pipeline.status_code == 201, pipeline.text
        pipeline_id = pipeline.json()["id"]
        wait_until(
            lambda: client.get(f"/jobs/{pipeline_id}").json()["status"] in ("finished", "failed", "canceled"),
            300,
            "the pipeline",
        )
        assert client.get(f"/jobs/{pipeline_id}").json()["status"] == "finished"
        jobs = client.get("/jobs", params={"run": "now"}).json()["jobs"]
        stages = {job["kind"]: job["id"] for job in jobs if job["pipeline_id"]}
        assert set(stages) == {"tokenizer", "base_train", "chat_sft", "chat_eval"}
        sft = client.get(f"/jobs/{stages['chat_sft']}").json()["result"]
    assert (sft["recipe"], sft["source"], sft["steps"]) == ("current", "now/base step 4", 2)
    assert not (pipe_stack.base_dir / "runs" / "now" / "mid").exists()
