"""A stop is honoured within seconds during an evaluation too: base_train's final val bpb and RL's pass@k
are each set to take minutes, and a stop in the middle of one ends the program by itself (its
"stopped at step" line, exit 143), before the worker's SIGKILL after the grace period (20 s here)."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.inference.conftest import tiny_tokenizer, write_checkpoint

from conftest import Stack, start_stack
from sse import read_events
from support import wait_until

# About 10 minutes of evaluation on a CPU: only a stop ends it in time.
LONG_VAL_BPB = {"eval_every": 0, "eval_tokens": 100_000_000, "sample_every": -1, "core_metric_every": -1}
LONG_PASS_AT_K = {"eval_every": 1, "eval_examples": 1000, "max_new_tokens": 250, "device_batch_size": 4}


@pytest.fixture(scope="module")
def eval_stack(redis_url: str, data_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A worker, and two runs with a tokenizer: `val` for base_train, `rl` with an sft checkpoint whose
    replies never stop by themselves (so each pass@k problem takes max_new_tokens)."""
    workdir = tmp_path_factory.mktemp("stop-eval")
    runs = workdir / "base" / "runs"
    for run in ("val", "rl"):
        tiny_tokenizer().save(runs / run / "tokenizer")
    write_checkpoint(runs, "rl", "sft", 1, seed=1, never_stop=True)
    yield from start_stack(redis_url, workdir, data_kit, with_worker=True)


def stop_once_logged(stack: Stack, spec: dict, line: str) -> tuple[dict, list[str]]:
    """Submit, stop the job once `line` is in its log, follow it to its end: its record and log."""
    with stack.client() as client:
        job = client.post("/jobs", json=spec).json()
        wait_until(lambda: line in client.get(f"/jobs/{job['id']}/logs").text, 180, line)
        assert client.post(f"/jobs/{job['id']}/stop").status_code == 200
        events = read_events(client, f"/jobs/{job['id']}/logs?follow=true")
        return client.get(f"/jobs/{job['id']}").json(), [e.data for e in events if e.event == "message"]


def test_a_stop_during_base_trains_final_eval_ends_it_at_once_and_keeps_the_trained_weights(
    eval_stack: Stack,
) -> None:
    config = {"depth": 2, "head_dim": 64, "max_seq_len": 128, "device_batch_size": 4,
              "total_batch_size": 512, "num_iterations": 2, **LONG_VAL_BPB}  # fmt: skip
    spec = {"kind": "base_train", "run": "val", "config": config}
    record, lines = stop_once_logged(eval_stack, spec, "step 2/2 | loss")
    assert record["status"] == "stopped" and record["error"] == "stopped on request"
    assert "stopped at step 2; resume with --resume" in lines  # it ended by itself, not by SIGKILL
    assert (eval_stack.base_dir / "runs" / "val" / "base" / "step_000002" / "model.safetensors").exists()
    assert not any("| val bpb" in line for line in lines)  # no number from half an evaluation


def test_a_stop_during_rls_pass_at_k_ends_it_at_once(eval_stack: Stack) -> None:
    config = {"source": "sft", "num_iterations": 1, "examples_per_step": 1, "num_samples": 4}
    spec = {"kind": "chat_rl", "run": "rl", "config": {**config, **LONG_PASS_AT_K}}
    record, lines = stop_once_logged(eval_stack, spec, "source:")
    assert record["status"] == "stopped" and record["error"] == "stopped on request"
    assert "stopped at step 0; resume with --resume" in lines
    assert not any("pass@1" in line for line in lines)
