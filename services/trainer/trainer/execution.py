"""
Running code the model wrote: a calculator for tool calls during generation, and a sandbox for whole
programs (HumanEval's tests).

calculator(expr): arithmetic (+ - * / // on int and float literals, parentheses) and
'literal'.count('literal'), nothing else; evaluated by walking the parsed expression, so it is safe
from any thread (no eval(), no SIGALRM) and bounded (short input, no powers, no repetition).

run_program(source): a separate Python process (`python -I -S`: no site-packages, no environment
variables read) that, before the program's first line runs, locks itself in:
- wall-clock limit: the whole process group is killed when it runs out;
- rlimits: address space (memory), CPU seconds, size of written files, open files, no core dumps;
- seccomp filter: no fork/vfork/exec (so no subprocesses and no fork bombs; threads still work), no
  sockets except Unix ones (so no network, TCP or UDP, whatever the host's namespaces);
- Landlock (Linux ≥ 5.13): the file system is read-only and limited to the Python installation and
  system libraries (/usr, /lib*, /etc, /dev); writes go only to a fresh temporary working directory;
  /proc, home directories and the project are unreadable (so the parent's environment is too); on
  kernels with Landlock ABI ≥ 6, signals to processes outside the sandbox are refused;
- a scrubbed environment (PATH, LANG, HOME=its directory) and captured stdout/stderr, of which the
  first `max_output_bytes` are kept (the rest is read and dropped, so a flood neither blocks nor
  fills memory).
Not contained: CPU time within the limits, reading the allowed system files (e.g. /etc/passwd), and on
a kernel without Landlock, the file system (then `containment()` says so). `containment()` reports
which layers this machine applies; the checks run on Linux x86_64 and aarch64.
"""

import ast
import ctypes
import operator
import os
import platform
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

# -- calculator -----------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 200
BINARY_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
}
UNARY_OPERATORS = {ast.USub: operator.neg, ast.UAdd: operator.pos}


class Refused(ValueError):
    """An expression the calculator does not evaluate."""


def evaluate_node(node: ast.AST) -> int | float | str:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPERATORS:
        left, right = evaluate_node(node.left), evaluate_node(node.right)
        if isinstance(left, str) or isinstance(right, str):
            raise Refused("arithmetic on strings")
        return BINARY_OPERATORS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPERATORS:
        operand = evaluate_node(node.operand)
        if isinstance(operand, str):
            raise Refused("arithmetic on a string")
        return UNARY_OPERATORS[type(node.op)](operand)
    if (  # 'text'.count('x'): the one method call allowed
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "count"
        and isinstance(node.func.value, ast.Constant)
        and isinstance(node.func.value.value, str)
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.func.value.value.count(node.args[0].value)
    raise Refused(f"{type(node).__name__} is not allowed")


def calculator(expression: str) -> str | None:
    """The value of an arithmetic or str.count expression as text, or None when it is refused or fails.
    Thousands separators in numbers are dropped first ("1,200 * 3"), as GSM8K writes them."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        return None
    if "'" not in expression and '"' not in expression:
        expression = expression.replace(",", "")
    try:
        value = evaluate_node(ast.parse(expression.strip(), mode="eval").body)
    except (Refused, SyntaxError, ArithmeticError, ValueError, RecursionError):
        return None
    return None if isinstance(value, str) else str(value)


# -- sandbox ----------------------------------------------------------------------------------


@dataclass
class ExecutionResult:
    passed: bool  # exited with status 0 within the limits
    timed_out: bool
    memory_exceeded: bool
    error: str  # the last line of stderr (the exception), or why the run was stopped
    stdout: str
    stderr: str
    output_truncated: bool
    returncode: int | None
    seconds: float


# seccomp and Landlock constants (linux/seccomp.h, linux/filter.h, linux/audit.h, linux/landlock.h)
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
EPERM, EAGAIN, ENOSYS = 1, 11, 38
CLONE_THREAD, AF_UNIX = 0x00010000, 1
X32_SYSCALL_BIT = 0x40000000  # x32-ABI numbers on x86_64: refused outright
# syscall numbers: (audit arch, fork, vfork, execve, execveat, clone, clone3, socket, io_uring_setup)
SYSCALLS = {
    "x86_64": (0xC000003E, 57, 58, 59, 322, 56, 435, 41, 425),
    "aarch64": (0xC00000B7, None, None, 221, 281, 220, 435, 198, 425),
}
LANDLOCK_CREATE_RULESET, LANDLOCK_ADD_RULE, LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_TRUNCATE = 1 << 14
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

READ_ONLY_ROOTS = ["/usr", "/lib", "/lib64", "/lib32", "/etc", "/bin", "/sbin"]


def seccomp_program(machine: str) -> bytes | None:
    """A classic-BPF seccomp filter (list of 8-byte instructions) for this CPU, or None if unknown."""
    if machine not in SYSCALLS:
        return None
    arch, fork, vfork, execve, execveat, clone, clone3, socket, io_uring_setup = SYSCALLS[machine]
    LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06

    def instruction(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    errno = SECCOMP_RET_ERRNO
    denied = [(nr, EAGAIN) for nr in (fork, vfork) if nr is not None]
    denied += [(execve, EPERM), (execveat, EPERM), (io_uring_setup, EPERM)]
    # clone3 answers ENOSYS so that the C library falls back to clone, whose flags a filter can read.
    denied.append((clone3, ENOSYS))
    program = [  # another architecture's or the x32 ABI's syscalls: refused
        instruction(LD_W_ABS, 0, 0, 4),
        instruction(JEQ_K, 1, 0, arch),
        instruction(RET_K, 0, 0, errno | EPERM),
        instruction(LD_W_ABS, 0, 0, 0),  # the syscall number
        instruction(JGE_K, 0, 1, X32_SYSCALL_BIT),
        instruction(RET_K, 0, 0, errno | EPERM),
    ]
    for nr, error in denied:
        program += [instruction(JEQ_K, 0, 1, nr), instruction(RET_K, 0, 0, errno | error)]

    def allowed_if_first_argument(nr: int, test: int, value: int, error: int) -> list[bytes]:
        """Syscall nr passes only when args[0] (the low 32 bits, at offset 16) passes the test."""
        return [
            instruction(JEQ_K, 0, 4, nr),
            instruction(LD_W_ABS, 0, 0, 16),
            instruction(test, 0, 1, value),
            instruction(RET_K, 0, 0, SECCOMP_RET_ALLOW),
            instruction(RET_K, 0, 0, errno | error),
        ]

    program += allowed_if_first_argument(clone, JSET_K, CLONE_THREAD, EAGAIN)  # threads, not processes
    program += allowed_if_first_argument(socket, JEQ_K, AF_UNIX, EPERM)  # Unix sockets, no network
    program.append(instruction(RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return b"".join(program)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when it has none."""
    libc = ctypes.CDLL(None, use_errno=True)
    version = libc.syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(0, version)


def containment() -> dict[str, bool]:
    """Which layers run_program applies on this machine."""
    return {
        "process_and_rlimits": True,
        "seccomp_no_fork_exec_network": sys.platform == "linux" and platform.machine() in SYSCALLS,
        "landlock_filesystem": sys.platform == "linux" and landlock_abi() >= 1,
        "landlock_signals": sys.platform == "linux" and landlock_abi() >= 6,
    }


# Runs first in the sandbox process: locks the process in, then runs the program as __main__.
# It gets its settings as argv: program file, memory bytes, CPU seconds, file bytes, seccomp hex,
# read-only roots (os.pathsep-joined). Errors here abort the run: a sandbox that cannot lock itself in
# never runs the program.
RUNNER = r"""
import ctypes, os, resource, struct, sys
program, memory, cpu, file_size, seccomp_hex, roots = sys.argv[1:7]
libc = ctypes.CDLL(None, use_errno=True)
def check(result, what):
    if result < 0:
        raise OSError(ctypes.get_errno(), f"sandbox: {what} failed")
    return result
source = open(program, encoding="utf-8").read()
resource.setrlimit(resource.RLIMIT_AS, (int(memory), int(memory)))
resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu)))
resource.setrlimit(resource.RLIMIT_FSIZE, (int(file_size), int(file_size)))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
abi = max(0, libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))
if abi:
    handled = (1 << 13) - 1  # ABI 1 rights; later ABIs add refer, truncate, ioctl on devices
    handled |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    scoped = 3 if abi >= 6 else 0
    attr = struct.pack("QQQ", handled, 0, scoped) if abi >= 6 else struct.pack("Q", handled)
    ruleset = libc.syscall(444, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    check(ruleset, "landlock ruleset")
    read = 1 | 4 | 8  # execute, read file, read dir
    write = handled & ~read
    def allow(path, access):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        if not os.path.isdir(path):
            access &= 1 | 2 | 4 | (1 << 14) | (1 << 15)  # the rights that apply to a file
        rule = struct.pack("=Qi", access & handled, fd)
        check(libc.syscall(445, ruleset, ctypes.c_int(1), rule, ctypes.c_uint32(0)), f"landlock rule {path}")
        os.close(fd)
    for root in roots.split(os.pathsep):
        allow(root, read)
    allow(os.getcwd(), read | write)
    allow("/dev/null", 2 | 4)
    allow("/dev/urandom", 4)
    check(libc.syscall(446, ruleset, ctypes.c_uint32(0)), "landlock restrict")
    os.close(ruleset)
if seccomp_hex:
    filter_code = bytes.fromhex(seccomp_hex)
    buffer = ctypes.create_string_buffer(filter_code)
    fprog = struct.pack("HxxxxxxP", len(filter_code) // 8, ctypes.addressof(buffer))
    check(libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0), "seccomp")
sys.argv = [program]
exec(compile(source, "<program>", "exec"), {"__name__": "__main__"})
"""


def read_bounded(stream, limit: int, kept: list[bytes], overflow: list[bool]) -> None:
    """Keep the first `limit` bytes of a pipe, read and drop the rest (so the writer never blocks)."""
    size = 0
    while chunk := stream.read(65536):
        if size < limit:
            kept.append(chunk[: limit - size])
        if size + len(chunk) > limit:
            overflow[0] = True
        size += len(chunk)


def run_program(
    source: str,
    timeout: float = 10.0,
    memory_bytes: int = 512 * 2**20,
    max_output_bytes: int = 64 * 2**10,
    max_file_bytes: int = 16 * 2**20,
) -> ExecutionResult:
    """Run a Python program in the sandbox described at the top of this file."""
    machine = platform.machine()
    filter_code = seccomp_program(machine) if sys.platform == "linux" else None
    python_roots = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    roots = os.pathsep.join([*READ_ONLY_ROOTS, *sorted(python_roots)])
    with tempfile.TemporaryDirectory(prefix="sandbox-") as workdir:
        program = Path(workdir) / "program.py"
        program.write_text(source, encoding="utf-8")
        command = [
            sys.executable, "-I", "-S", "-B", "-c", RUNNER,
            str(program), str(memory_bytes), str(max(1, int(timeout) + 1)), str(max_file_bytes),
            filter_code.hex() if filter_code else "", roots,
        ]  # fmt: skip
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "PYTHONIOENCODING": "utf-8"}
        started = time.monotonic()
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: killed whole on timeout
        )
        outputs: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        overflow = [False]
        readers = [
            threading.Thread(target=read_bounded, args=(pipe, max_output_bytes, outputs[name], overflow))
            for name, pipe in (("stdout", process.stdout), ("stderr", process.stderr))
        ]
        for reader in readers:
            reader.start()
        timed_out = False
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for reader in readers:
            reader.join()
        seconds = time.monotonic() - started
    stdout = b"".join(outputs["stdout"]).decode("utf-8", errors="replace")
    stderr = b"".join(outputs["stderr"]).decode("utf-8", errors="replace")
    code = process.returncode
    timed_out = timed_out or code == -signal.SIGXCPU
    memory_exceeded = "MemoryError" in stderr
    last_line = stderr.strip().splitlines()[-1] if stderr.strip() else ""
    if timed_out:
        error = f"timed out after {timeout:g}s"
    elif code == -signal.SIGXFSZ:
        error = f"wrote a file larger than {max_file_bytes} bytes"
    elif code and code < 0:
        error = f"killed by {signal.Signals(-code).name}"
    else:
        error = last_line if code else ""
    return ExecutionResult(
        passed=code == 0 and not timed_out,
        timed_out=timed_out,
        memory_exceeded=memory_exceeded,
        error=error,
        stdout=stdout,
        stderr=stderr,
        output_truncated=overflow[0],
        returncode=code,
        seconds=round(seconds, 3),
    )
