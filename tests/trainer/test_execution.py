"""The sandbox contains what model-written code might do, and the calculator evaluates only arithmetic."""

import os
import platform
import resource
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from trainer.execution import calculator, containment, probe, run_program

CAPGET = {"x86_64": 125, "aarch64": 90}  # the capget syscall's number
LAYERS = containment()
needs_linux_containment = pytest.mark.skipif(
    not all(LAYERS.values()), reason=f"this kernel does not offer every containment layer: {LAYERS}"
)


@needs_linux_containment
def test_an_honest_program_runs_with_its_output_and_a_scratch_directory() -> None:
    result = run_program(
        "import math\nopen('notes.txt', 'w').write('x')\nprint(math.factorial(5), open('notes.txt').read())"
    )
    assert result.passed and result.stdout == "120 x\n" and result.error == "" and not result.timed_out


@needs_linux_containment
def test_a_failing_program_reports_its_exception() -> None:
    result = run_program("assert 1 + 1 == 3, 'bad arithmetic'")
    assert not result.passed and result.returncode == 1 and result.error == "AssertionError: bad arithmetic"


@needs_linux_containment
def test_an_infinite_loop_is_stopped_at_the_time_limit() -> None:
    result = run_program("while True:\n    pass", timeout=1.0)
    assert result.timed_out and not result.passed and result.seconds < 5


@needs_linux_containment
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


@needs_linux_containment
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


@pytest.fixture
def victim() -> Iterator[subprocess.Popen]:
    """Another process of the same user, as the worker or the trainer is to the sandbox."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def attempts(calls: dict[str, str]) -> str:
    """A program that tries each call and prints `name refused` or `name done`."""
    lines = ["import os, resource, signal"]
    for name, call in calls.items():
        lines += ["try:", f"    {call}", f"    print({name!r}, 'done')", "except PermissionError:"]
        lines += [f"    print({name!r}, 'refused')"]
    return "\n".join(lines)


@needs_linux_containment
def test_limits_and_priorities_of_other_processes_are_out_of_reach(victim: subprocess.Popen) -> None:
    pid = victim.pid
    program = attempts(
        {
            "prlimit": f"resource.prlimit({pid}, resource.RLIMIT_CPU, (1, 1))",
            "setpriority": f"os.setpriority(os.PRIO_PROCESS, {pid}, 19)",
            "affinity": f"os.sched_setaffinity({pid}, {{0}})",
            "scheduler": f"os.sched_setscheduler({pid}, os.SCHED_IDLE, os.sched_param(0))",
        }
    )
    before = [resource.prlimit(pid, resource.RLIMIT_CPU), os.getpriority(os.PRIO_PROCESS, pid)]
    before += [os.sched_getaffinity(pid), os.sched_getscheduler(pid)]
    result = run_program(program)
    names = ["prlimit", "setpriority", "affinity", "scheduler"]
    assert result.stdout.splitlines() == [f"{name} refused" for name in names]
    assert [resource.prlimit(pid, resource.RLIMIT_CPU), os.getpriority(os.PRIO_PROCESS, pid)] == before[:2]
    assert [os.sched_getaffinity(pid), os.sched_getscheduler(pid)] == before[2:]


@needs_linux_containment
def test_its_own_limits_priority_and_signals_stay_its_own_to_set() -> None:
    program = (
        "import os, resource, signal\n"
        "caught = []\n"
        "signal.signal(signal.SIGUSR1, lambda *_: caught.append(1))\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "signal.raise_signal(signal.SIGUSR1)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))\n"
        "os.nice(1)\n"
        "os.sched_setaffinity(0, os.sched_getaffinity(0))\n"
        "print(len(caught), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    result = run_program(program)
    assert result.passed and result.stdout == "2 32\n", result.stderr


@needs_linux_containment
def test_started_by_root_it_cannot_raise_its_priority_or_its_hard_limits() -> None:
    """Root's capabilities would let it: a real-time busy loop would starve the trainer's threads. It
    holds none (capget), so this holds whatever capabilities the machine gives root."""
    program = attempts(
        {
            "nice": "os.setpriority(os.PRIO_PROCESS, 0, -10)",
            "real-time": "os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))",
            "hard limit": "resource.prlimit(0, resource.RLIMIT_AS, (resource.RLIM_INFINITY,) * 2)",
        }
    )
    capget = CAPGET[platform.machine()]
    program += (
        "\nimport ctypes, struct\n"
        "sets = ctypes.create_string_buffer(24)  # effective, permitted, inheritable; two halves each\n"
        f"done = ctypes.CDLL(None).syscall({capget}, struct.pack('Ii', 0x20080522, 0), sets)\n"
        "print('capabilities', done, sum(sets.raw))\n"
    )
    result = run_program(program)
    expected = ["nice refused", "real-time refused", "hard limit refused", "capabilities 0 0"]
    assert result.stdout.splitlines() == expected, result.stderr


@needs_linux_containment
def test_no_unix_socket_reaches_a_local_service(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX) as service:
        service.bind(str(path))
        service.listen()
        service.settimeout(0.5)
        result = run_program(f"import socket\nsocket.socket(socket.AF_UNIX).connect({str(path)!r})")
        with pytest.raises(TimeoutError):
            service.accept()
    assert "PermissionError" in result.error


@needs_linux_containment
@pytest.mark.parametrize("make", ["open(f'f{made}', 'w').close()", "os.mkdir(f'd{made}')"])
def test_its_folder_holds_a_bounded_number_of_files(make: str) -> None:
    program = f"import os\nmade = 0\ntry:\n    while made < 1000:\n        {make}\n        made += 1\n"
    result = run_program(program + "finally:\n    print(made)", max_files=16)
    assert int(result.stdout) == 16 and "Disk quota exceeded" in result.error


@needs_linux_containment
def test_a_file_cannot_grow_past_the_limit_by_preallocation() -> None:
    program = (
        "import ctypes, os\n"
        "fd = os.open('big', os.O_CREAT | os.O_WRONLY)\n"
        "ctypes.CDLL(None).fallocate(fd, 1, ctypes.c_long(0), ctypes.c_long(64 << 20))  # KEEP_SIZE\n"
        "print(os.fstat(fd).st_blocks * 512)\n"
    )
    result = run_program(program, max_file_bytes=2**20)
    assert int(result.stdout) <= 2**20


@pytest.mark.parametrize(
    "lacking",
    [
        replace(probe(), landlock_abi=0),  # kernels before 5.13, or Landlock not in the LSM list
        replace(probe(), seccomp=False),
        replace(probe(), seccomp_notify=False),
        replace(probe(), machine=""),  # a CPU whose syscall numbers the filter does not know, or not Linux
    ],
)
def test_the_sandbox_refuses_to_run_without_every_layer(tmp_path: Path, lacking) -> None:
    marker = tmp_path / "ran.txt"
    result = run_program(f"open({str(marker)!r}, 'w').write('unconfined')", kernel=lacking)
    missing = [layer for layer, active in containment(lacking).items() if not active]
    assert missing and result.refused and not result.passed and not marker.exists()
    assert result.error.startswith("sandbox refused to run")
    assert all(layer in result.error for layer in missing)


@needs_linux_containment
def test_signals_reach_no_other_process_where_landlock_does_not_scope_them(victim: subprocess.Popen) -> None:
    before_scoping = replace(probe(), landlock_abi=5)  # Landlock ABI 1-5: Linux 5.13 to 6.11
    program = attempts(
        {
            "probe_every_process": "os.kill(-1, 0)",  # signal 0 only checks: harmless if it got through
            "kill": f"os.kill({victim.pid}, signal.SIGKILL)",
            "pidfd": f"signal.pidfd_send_signal(os.pidfd_open({victim.pid}), signal.SIGKILL)",
        }
    )
    result = run_program(program, kernel=before_scoping)
    assert result.stdout.splitlines() == ["probe_every_process refused", "kill refused", "pidfd refused"]
    assert victim.poll() is None
