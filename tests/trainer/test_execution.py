"""The sandbox contains what model-written code might do, and the calculator evaluates only arithmetic."""

import threading
from pathlib import Path

import pytest

from trainer.execution import calculator, containment, run_program

LINUX_LAYERS = containment()
needs_linux_containment = pytest.mark.skipif(
    not (LINUX_LAYERS["seccomp_no_fork_exec_network"] and LINUX_LAYERS["landlock_filesystem"]),
    reason=f"this kernel does not offer every containment layer: {LINUX_LAYERS}",
)


def test_an_honest_program_runs_with_its_output_and_a_scratch_directory() -> None:
    result = run_program(
        "import math\nopen('notes.txt', 'w').write('x')\nprint(math.factorial(5), open('notes.txt').read())"
    )
    assert result.passed and result.stdout == "120 x\n" and result.error == "" and not result.timed_out


def test_a_failing_program_reports_its_exception() -> None:
    result = run_program("assert 1 + 1 == 3, 'bad arithmetic'")
    assert not result.passed and result.returncode == 1 and result.error == "AssertionError: bad arithmetic"


def test_an_infinite_loop_is_stopped_at_the_time_limit() -> None:
    result = run_program("while True:\n    pass", timeout=1.0)
    assert result.timed_out and not result.passed and result.seconds < 5


def test_a_2_gb_allocation_fails_with_memory_exceeded() -> None:
    result = run_program("block = bytearray(2 * 1024**3)")
    assert result.memory_exceeded and not result.passed


@needs_linux_containment
def test_a_fork_bomb_cannot_fork() -> None:
    result = run_program("import os\nwhile True:\n    os.fork()", timeout=5.0)
    assert not result.passed and not result.timed_out and "Resource temporarily unavailable" in result.error


@needs_linux_containment
def test_no_subprocesses() -> None:
    result = run_program("import subprocess\nsubprocess.run(['true'])")
    assert not result.passed


@needs_linux_containment
def test_a_write_outside_its_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('out')")
    assert "PermissionError" in result.error and not target.exists()


@needs_linux_containment
def test_the_parents_environment_is_out_of_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "s3cret")
    program = "import os\nprint(sorted(os.environ))\nprint(open(f'/proc/{os.getppid()}/environ').read())\n"
    result = run_program(program)
    assert "NANOCHAT_TEST_SECRET" not in result.stdout and "s3cret" not in result.stdout
    assert "PermissionError" in result.error


@needs_linux_containment
def test_no_network(tmp_path: Path) -> None:
    result = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)")
    assert "PermissionError" in result.error


def test_100_mb_of_output_is_kept_to_the_bound_without_blocking() -> None:
    result = run_program(
        "import sys\nfor _ in range(100):\n    sys.stdout.write('x' * 1_000_000)", max_output_bytes=1000
    )
    assert result.passed and result.output_truncated and result.stdout == "x" * 1000


def test_the_calculator_does_gsm8k_arithmetic_and_counting() -> None:
    assert calculator("12/60") == "0.2" and calculator("0.2*50") == "10.0"
    assert calculator("1,200 * 3") == "3600" and calculator("(7 - 2) // 2") == "2"
    assert calculator("'strawberry'.count('r')") == "3"
    assert calculator("1/0") is None


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "(1).__class__",
        "9**9**9",
        "'a' * 10**9",
        "'abc'.upper()",
        "open('x')",
        "x + 1",
        "1" * 300,
    ],
)
def test_the_calculator_refuses_everything_else(expression: str) -> None:
    assert calculator(expression) is None


def test_the_calculator_works_from_any_thread() -> None:
    results = []
    thread = threading.Thread(target=lambda: results.append(calculator("6*7")))
    thread.start()
    thread.join()
    assert results == ["42"]
