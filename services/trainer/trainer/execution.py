"""
Running code the model wrote: a calculator for tool calls during generation, and a sandbox for whole
programs (HumanEval's tests).

calculator(expr): arithmetic (+ - * / // on int and float literals, parentheses) and
'literal'.count('literal'), nothing else; evaluated by walking the parsed expression, so it is safe
from any thread (no eval(), no SIGALRM) and bounded (short input, no powers, no repetition).

run_program(source): a separate Python process (`python -I -S`: no site-packages, no environment
variables read) that, before the program's first line runs, locks itself in:
- wall-clock limit: the whole process group is killed when it runs out;
- rlimits: address space (memory), CPU seconds, size of each written file, open files, no core dumps;
- seccomp filter: no fork/vfork/exec (so no subprocesses and no fork bombs; threads still work); no
  sockets of any kind (no network, and no Docker socket or local database by path); signals, rlimits,
  nice values, scheduling and memory placement only for its own process (so it cannot kill, prlimit,
  renice or starve the trainer or any other process of the user, on any Landlock ABI); no ptrace or
  other windows into other processes;
- Landlock (Linux ≥ 5.13): the file system is read-only and limited to the Python installation and
  system libraries (/usr, /lib*, /etc, /dev); writes go only to a fresh temporary working directory;
  /proc, home directories and the project are unreadable (so the parent's environment is too); from
  Landlock ABI 6 it also scopes signals and abstract Unix sockets, twice over the seccomp filter;
- a quota on that directory: at most `max_files` files, directories or links made (each call that
  makes one counts, through a seccomp user notification the parent answers), each at most
  `max_file_bytes` (RLIMIT_FSIZE; preallocation past it refused), so max_files × max_file_bytes in all;
- no capabilities: started by root, it gives up every one (root's CAP_SYS_RESOURCE would raise its
  hard limits, CAP_SYS_NICE its priority and real-time scheduling over the trainer's threads);
- a scrubbed environment (PATH, LANG, HOME=its directory) and captured stdout/stderr, of which the
  first `max_output_bytes` are kept (the rest is read and dropped, so a flood neither blocks nor
  fills memory).
`containment()` lists these layers and whether this machine has each: Linux on x86_64 or aarch64 with
seccomp filters, user notifications (5.0) and Landlock. Where one is missing, run_program refuses
(`refused`, the reason in `error`) and runs nothing. Not contained: CPU time within the limits and
reading the allowed system files (e.g. /etc/passwd).
"""

import ast
import contextlib
import ctypes
import fcntl
import functools
import operator
import os
import platform
import select
import signal
import socket
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
    error: str  # the last line of stderr (the exception), or why the run was stopped or refused
    stdout: str
    stderr: str
    output_truncated: bool
    returncode: int | None
    seconds: float
    refused: bool = False  # this machine lacks a containment layer: the program never ran


# seccomp and Landlock constants (linux/seccomp.h, linux/filter.h, linux/audit.h, linux/landlock.h)
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_USER_NOTIF = 0x7FFF0000, 0x00050000, 0x7FC00000
SECCOMP_IOCTL_NOTIF_RECV, SECCOMP_IOCTL_NOTIF_SEND = 0xC0502100, 0xC0182101  # _IOWR('!', 0|1, ...)
SECCOMP_NOTIF_BYTES, SECCOMP_USER_NOTIF_FLAG_CONTINUE = 80, 1
EPERM, EAGAIN, ENOSYS, EOPNOTSUPP, EDQUOT = 1, 11, 38, 95, 122
CLONE_THREAD, PRIO_PROCESS, RENAME_WHITEOUT = 0x00010000, 0, 4
CREATES_A_FILE = 0o100 | 0o20000000  # O_CREAT | __O_TMPFILE, the same on x86_64 and aarch64
X32_SYSCALL_BIT = 0x40000000  # x32-ABI numbers on x86_64: refused outright
AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
SYSCALL_NUMBERS = {  # name: (x86_64, aarch64); None where the CPU has only the *at form
    "fork": (57, None), "vfork": (58, None), "execve": (59, 221), "execveat": (322, 281),
    "clone": (56, 220), "clone3": (435, 435), "socket": (41, 198), "io_uring_setup": (425, 425),
    "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240), "pidfd_open": (434, 434), "pidfd_send_signal": (424, 424),
    "pidfd_getfd": (438, 438), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "kcmp": (312, 272), "process_madvise": (440, 440),
    "perf_event_open": (298, 241), "prlimit64": (302, 261), "setpriority": (141, 140),
    "ioprio_set": (251, 30), "sched_setparam": (142, 118), "sched_setscheduler": (144, 119),
    "sched_setaffinity": (203, 122), "sched_setattr": (314, 274), "migrate_pages": (256, 238),
    "move_pages": (279, 239), "open": (2, None), "openat": (257, 56), "openat2": (437, 437),
    "creat": (85, None), "mkdir": (83, None), "mkdirat": (258, 34), "mknod": (133, None),
    "mknodat": (259, 33), "link": (86, None), "linkat": (265, 37), "symlink": (88, None),
    "symlinkat": (266, 36), "renameat2": (316, 276), "fallocate": (285, 47), "seccomp": (317, 277),
    "capset": (126, 91),
}  # fmt: skip
LANDLOCK_CREATE_RULESET = 444  # the same number on every CPU

READ_ONLY_ROOTS = ["/usr", "/lib", "/lib64", "/lib32", "/etc", "/bin", "/sbin"]


def syscall_number(machine: str, name: str) -> int | None:
    return SYSCALL_NUMBERS[name][list(AUDIT_ARCH).index(machine)]


# What the filter decides, by syscall name. Refused, with the errno the caller sees: processes (threads
# are allowed: see clone), programs, sockets of any kind (no network, no Docker socket or local database
# by path), device nodes, and reaching into other processes. clone3 and openat2 answer ENOSYS so that
# the C library falls back to clone and openat, whose flags a filter can read (theirs are behind a
# pointer). fallocate's FALLOC_FL_KEEP_SIZE allocates past RLIMIT_FSIZE; refused, posix_fallocate falls
# back to writing, which the limit holds.
REFUSED = {
    **dict.fromkeys(["fork", "vfork"], EAGAIN),
    **dict.fromkeys(["clone3", "openat2"], ENOSYS),
    "fallocate": EOPNOTSUPP,
    **dict.fromkeys(["execve", "execveat", "io_uring_setup", "socket", "mknod", "mknodat"], EPERM),
    **dict.fromkeys(["ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "process_madvise"], EPERM),
    **dict.fromkeys(["perf_event_open", "pidfd_open", "pidfd_send_signal", "pidfd_getfd"], EPERM),
    "ioprio_set": EPERM,
}
# Signals, limits, scheduling and memory placement: allowed on its own process only (Landlock scopes
# signals from ABI 6 on, and never limits or priorities), else EPERM.
OWN_PROCESS_ONLY = ["kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "prlimit64"]
OWN_PROCESS_ONLY += ["sched_setparam", "sched_setscheduler", "sched_setaffinity", "sched_setattr"]
OWN_PROCESS_ONLY += ["migrate_pages", "move_pages"]
# The folder's quota: calls that make a file, directory or link ask the supervisor, which counts them
# (open and openat only with O_CREAT or O_TMPFILE); a rename that leaves a whiteout is refused.
COUNTED = ["creat", "mkdir", "mkdirat", "link", "linkat", "symlink", "symlinkat"]


def seccomp_program(machine: str, pid: int) -> bytes:
    """The classic-BPF seccomp filter (8-byte instructions) for the sandbox process `pid` on this CPU.
    An argument is read as its low 32 bits: pids, flags and `which` are C ints, which the kernel
    truncates to those bits too."""
    LD_W_ABS, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, NOTIFY = SECCOMP_RET_ALLOW, SECCOMP_RET_USER_NOTIF

    def instruction(code: int, jt: int, jf: int, k: int) -> bytes:
        return struct.pack("HBBI", code, jt, jf, k)

    def load(arg: int) -> bytes:
        return instruction(LD_W_ABS, 0, 0, 16 + 8 * arg)  # seccomp_data.args[arg], little-endian

    def ret(action: int) -> bytes:
        return instruction(RET_K, 0, 0, action)

    def deny(error: int) -> bytes:
        return ret(SECCOMP_RET_ERRNO | error)

    def returns_if(test: int, value: int, action: int) -> list[bytes]:
        return [instruction(test, 0, 1, value), ret(action)]

    def own_process(arg: int) -> list[bytes]:
        """Allowed when args[arg] is 0 or the sandbox's pid (for kill, 0 is its process group: itself
        alone, as it leads its own session and cannot fork), else EPERM."""
        return [load(arg), *returns_if(JEQ_K, 0, ALLOW), *returns_if(JEQ_K, pid, ALLOW), deny(EPERM)]

    def counted_if_creating(flags_arg: int) -> list[bytes]:
        return [load(flags_arg), *returns_if(JSET_K, CREATES_A_FILE, NOTIFY), ret(ALLOW)]

    rules = {name: [deny(error)] for name, error in REFUSED.items()}  # syscall → its decision
    rules |= {name: own_process(0) for name in OWN_PROCESS_ONLY}
    rules |= {name: [ret(NOTIFY)] for name in COUNTED}
    rules |= {
        "clone": [load(0), *returns_if(JSET_K, CLONE_THREAD, ALLOW), deny(EAGAIN)],  # threads only
        # its own nice value only: PRIO_PROCESS of itself, never its group or every process of its user
        "setpriority": [load(0), instruction(JEQ_K, 1, 0, PRIO_PROCESS), deny(EPERM), *own_process(1)],
        "open": counted_if_creating(1),
        "openat": counted_if_creating(2),
        "renameat2": [load(4), *returns_if(JSET_K, RENAME_WHITEOUT, SECCOMP_RET_ERRNO | EPERM), ret(ALLOW)],
    }
    program = [  # another architecture's or the x32 ABI's syscalls: refused
        instruction(LD_W_ABS, 0, 0, 4),
        instruction(JEQ_K, 1, 0, AUDIT_ARCH[machine]),
        deny(EPERM),
        instruction(LD_W_ABS, 0, 0, 0),  # the syscall number, kept in the accumulator between rules
        instruction(JGE_K, 0, 1, X32_SYSCALL_BIT),
        deny(EPERM),
    ]
    for name, body in rules.items():  # every path of a rule's body returns
        if (nr := syscall_number(machine, name)) is not None:
            program += [instruction(JEQ_K, 0, len(body), nr), *body]
    program.append(ret(ALLOW))
    return b"".join(program)


@dataclass(frozen=True)
class Kernel:
    """What this machine offers the sandbox: probe() asks the kernel; tests pass one that lacks a layer."""

    machine: str  # platform.machine(), "" off Linux
    seccomp: bool  # seccomp filters that answer with an errno
    seccomp_notify: bool  # filters that ask a supervisor (Linux ≥ 5.0; CONTINUE, 5.5, comes with Landlock)
    landlock_abi: int  # 0: no Landlock


@functools.cache
def probe() -> Kernel:
    machine = platform.machine()
    if sys.platform != "linux" or machine not in AUDIT_ARCH:
        return Kernel("", seccomp=False, seccomp_notify=False, landlock_abi=0)
    libc = ctypes.CDLL(None, use_errno=True)

    def available(action: int) -> bool:
        value = ctypes.c_uint32(action)
        nr = syscall_number(machine, "seccomp")
        return libc.syscall(nr, SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(value)) == 0

    abi = libc.syscall(LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # VERSION
    return Kernel(machine, available(SECCOMP_RET_ERRNO), available(SECCOMP_RET_USER_NOTIF), max(0, abi))


def containment(kernel: Kernel | None = None) -> dict[str, bool]:
    """The layers run_program relies on and whether this machine (or `kernel`) has each; it runs a
    program only when every one is there."""
    kernel = kernel or probe()
    return {
        "rlimits": True,
        "seccomp_processes_sockets_signals": kernel.machine in AUDIT_ARCH and kernel.seccomp,
        "landlock_filesystem": kernel.landlock_abi >= 1,
        "file_quota": kernel.seccomp_notify,
    }


# Runs first in the sandbox process: locks the process in, then runs the program as __main__.
# It gets its settings as argv: program file, memory bytes, CPU seconds, file bytes, Landlock ABI, the
# seccomp and capset syscalls' numbers, the fd of its channel to the parent, read-only roots
# (os.pathsep-joined).
# From the channel it reads the seccomp filter (which names its pid, so the parent builds it once the
# process exists), and back it sends the filter's listener, through which the parent counts the files
# it makes. Errors here abort the run: a sandbox that cannot lock itself in never runs the program.
RUNNER = r"""
import ctypes, os, resource, socket, struct, sys
program, memory, cpu, file_size, abi, seccomp_nr, capset_nr, channel_fd, roots = sys.argv[1:10]
libc = ctypes.CDLL(None, use_errno=True)
def check(result, what):
    if result < 0:
        raise OSError(ctypes.get_errno(), f"sandbox: {what} failed")
    return result
channel = socket.socket(fileno=int(channel_fd))
filter_code = b"".join(iter(lambda: channel.recv(65536), b""))
if not filter_code:
    raise OSError("sandbox: no seccomp filter from the parent")
source = open(program, encoding="utf-8").read()
resource.setrlimit(resource.RLIMIT_AS, (int(memory), int(memory)))
resource.setrlimit(resource.RLIMIT_CPU, (int(cpu), int(cpu)))
resource.setrlimit(resource.RLIMIT_FSIZE, (int(file_size), int(file_size)))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
resource.setrlimit(resource.RLIMIT_NICE, (0, 0))  # no priority above the default without capabilities
resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0))  # and no real-time scheduling
no_capabilities = bytes(24)  # effective, permitted and inheritable sets, both 32-bit halves: empty
check(libc.syscall(int(capset_nr), struct.pack("Ii", 0x20080522, 0), no_capabilities), "capset")  # v3, self
check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
abi = int(abi)
if abi < 1:
    raise OSError("sandbox: no Landlock")
handled = (1 << 13) - 1  # ABI 1 rights; later ABIs add refer, truncate, ioctl on devices
handled |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
scoped = 3 if abi >= 6 else 0  # abstract Unix sockets and signals, on top of the seccomp filter
attr = struct.pack("QQQ", handled, 0, scoped) if abi >= 6 else struct.pack("Q", handled)
ruleset = check(libc.syscall(444, attr, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)), "landlock ruleset")
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
buffer = ctypes.create_string_buffer(filter_code)
fprog = struct.pack("HxxxxxxP", len(filter_code) // 8, ctypes.addressof(buffer))
listener = check(libc.syscall(int(seccomp_nr), 1, 8, ctypes.c_char_p(fprog)), "seccomp")  # + NEW_LISTENER
socket.send_fds(channel, [b"L"], [listener])
os.close(listener)
channel.close()
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


def supervise_file_quota(channel: socket.socket, max_files: int, finished: threading.Event) -> None:
    """Answer the sandbox's calls that make a file, directory or link: the first `max_files` go ahead,
    the rest fail with EDQUOT. Calls are counted, not the files that end up existing (re-creating a file
    counts again): no race can undercount, and each file is held to RLIMIT_FSIZE, so the folder never
    holds more than max_files × max_file_bytes."""
    _, fds, _, _ = socket.recv_fds(channel, 1, 1)
    if not fds:
        return  # the sandbox stopped before it locked itself in; its stderr says why
    listener, made = fds[0], 0
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    try:
        while not finished.is_set():
            events = poller.poll(100)
            if events and not events[0][1] & select.POLLIN:
                return  # the filter has no process left (POLLHUP)
            if not events:
                continue
            request = bytearray(SECCOMP_NOTIF_BYTES)
            try:
                fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, request)
            except OSError:
                continue  # the call was interrupted (the process was killed)
            made += 1
            allowed = made <= max_files
            request_id = struct.unpack_from("Q", request)[0]
            flags, error = (SECCOMP_USER_NOTIF_FLAG_CONTINUE, 0) if allowed else (0, -EDQUOT)
            response = struct.pack("=QqiI", request_id, 0, error, flags)
            with contextlib.suppress(OSError):  # the process is gone
                fcntl.ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, response)
    finally:
        os.close(listener)


def refusal(missing: list[str]) -> ExecutionResult:
    why = f"sandbox refused to run: this machine lacks {', '.join(missing)} (see trainer/execution.py)"
    return ExecutionResult(False, False, False, why, "", "", False, None, 0.0, refused=True)


def run_program(
    source: str,
    timeout: float = 10.0,
    memory_bytes: int = 512 * 2**20,
    max_output_bytes: int = 64 * 2**10,
    max_file_bytes: int = 16 * 2**20,
    max_files: int = 16,
    kernel: Kernel | None = None,
) -> ExecutionResult:
    """Run a Python program in the sandbox described at the top of this file, or refuse to (`refused`)
    when this machine, or `kernel`, lacks a layer."""
    kernel = kernel or probe()
    missing = [layer for layer, active in containment(kernel).items() if not active]
    if missing:
        return refusal(missing)
    python_roots = {sys.base_prefix, sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    roots = os.pathsep.join([*READ_ONLY_ROOTS, *sorted(python_roots)])
    with tempfile.TemporaryDirectory(prefix="sandbox-") as workdir:
        program = Path(workdir) / "program.py"
        program.write_text(source, encoding="utf-8")
        channel, sandbox_end = socket.socketpair()
        command = [
            sys.executable, "-I", "-S", "-B", "-c", RUNNER,
            str(program), str(memory_bytes), str(max(1, int(timeout) + 1)), str(max_file_bytes),
            str(kernel.landlock_abi), str(syscall_number(kernel.machine, "seccomp")),
            str(syscall_number(kernel.machine, "capset")),
            str(sandbox_end.fileno()), roots,
        ]  # fmt: skip
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "PYTHONIOENCODING": "utf-8"}
        started = time.monotonic()
        with channel, sandbox_end:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(sandbox_end.fileno(),),
                start_new_session=True,  # its own process group: killed whole on timeout
            )
            sandbox_end.close()  # so that the channel ends when the sandbox does
            with contextlib.suppress(OSError):  # the sandbox died before reading it; its stderr says why
                channel.sendall(seccomp_program(kernel.machine, process.pid))
                channel.shutdown(socket.SHUT_WR)
            finished = threading.Event()
            supervisor = threading.Thread(target=supervise_file_quota, args=(channel, max_files, finished))
            outputs: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
            overflow = [False]
            readers = [
                threading.Thread(target=read_bounded, args=(pipe, max_output_bytes, outputs[name], overflow))
                for name, pipe in (("stdout", process.stdout), ("stderr", process.stderr))
            ]
            for thread in [supervisor, *readers]:
                thread.start()
            timed_out = False
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            finished.set()
            for thread in [supervisor, *readers]:
                thread.join()
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
