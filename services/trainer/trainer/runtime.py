"""
Where and how a training program runs: device and precision, the processes of a torchrun launch,
the flags every training program shares, the peak FLOPs behind MFU, stop signals, and wandb.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from trainer.common import BATCH_SIZE, CHECKPOINT_STEP, EVERY_N_STEPS, SEED, STEP_COUNT, Bounded, print0
from trainer.settings import TrainerSettings

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; fp32 runs count as TF32 (half).
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def add_training_flags(parser: argparse.ArgumentParser, inherited: bool = False) -> None:
    """Flags shared by base, mid and SFT training. With `inherited`, batch flags default to the
    source checkpoint's (a chat stage trains with the batch its base run used)."""
    group = parser.add_argument_group("Training")
    group.add_argument(
        "--num-iterations", type=STEP_COUNT, default=None, help="optimizer steps (default: derived)"
    )

    def batch_flag(flag: str, bounds: Bounded, default: int | None, text: str) -> None:
        shown = "the source run's" if inherited else (f"{default:,}" if default else "derived")
        group.add_argument(
            flag, type=bounds, default=None if inherited else default, help=f"{text} (default: {shown})"
        )

    batch_flag("--device-batch-size", BATCH_SIZE, 32, "sequences per forward pass")
    batch_flag("--total-batch-size", Bounded(int, 16, 2**26), None, "tokens per optimizer step")
    batch_flag("--max-seq-len", Bounded(int, 16, 65536), 2048, "tokens per sequence")
    group = parser.add_argument_group("Evaluation and checkpoints")
    group.add_argument(
        "--eval-every",
        type=EVERY_N_STEPS,
        default=250,
        help="steps between val evaluations (and one at the end), 0: only at the end, -1: off "
        "(default: %(default)s)",
    )
    add_checkpoint_flags(group, save_every=1000)
    group = add_runtime_flags(parser)
    group.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (default: on for CUDA, off elsewhere)",
    )
    group.add_argument("--seed", type=SEED, default=42, help="initialisation and sampling seed (default: 42)")


def add_checkpoint_flags(group: argparse._ArgumentGroup, save_every: int) -> None:
    """--save-every, --keep-checkpoints and the resume flags of every training program."""
    group.add_argument(
        "--save-every",
        type=EVERY_N_STEPS,
        default=save_every,
        help="steps between checkpoints (one at the end too), -1: only at the end (default: %(default)s)",
    )
    group.add_argument(
        "--keep-checkpoints",
        type=Bounded(int, 0, 1000),
        default=3,
        help="checkpoints kept, 0: all (default: last 3)",
    )
    group.add_argument("--resume", action="store_true", help="continue from the latest valid checkpoint")
    group.add_argument(
        "--resume-from-step", type=CHECKPOINT_STEP, default=None, help="continue from this checkpoint step"
    )


def add_runtime_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--device and --dtype: every program that runs a model has them. Returns their group."""
    group = parser.add_argument_group("Runtime")
    group.add_argument(
        "--device", default="auto", help="auto (cuda > mps > cpu), cuda, mps or cpu (default: auto)"
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *DTYPES],
        help="compute dtype; auto: bfloat16 on CUDA SM≥80, float32 elsewhere (float16 adds a grad scaler)",
    )
    return group


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The value averaged over processes (for logging)."""
        if not self.distributed:
            return value
        tensor = torch.tensor(value, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return tensor.item() / self.world_size

    def any(self, flag: bool) -> bool:
        """True on every process if it is True on any (so all processes take the same branch)."""
        if not self.distributed:
            return flag
        tensor = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value (any picklable object) on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def gpus(self) -> int:
        """GPUs this run uses (0 on a CPU): what a cost estimate counts."""
        return self.world_size if self.device.type == "cuda" else 0

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# The oldest NVIDIA driver each CUDA major version of torch's builds runs on (CUDA's release notes).
DRIVER_MINIMUM = {12: "525.60.13", 13: "580.65.06"}


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version when nvidia-smi sees a GPU here, else None."""
    try:
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    versions = found.stdout.split()
    return versions[0] if found.returncode == 0 and versions else None


def check_gpus_usable() -> None:
    """SystemExit when this machine has NVIDIA GPUs that this CUDA build of torch cannot use (a driver
    too old for its CUDA line): falling back to the CPU without a word would train for days."""
    if torch.version.cuda is None or torch.cuda.is_available() or (driver := nvidia_driver()) is None:
        return
    minimum = DRIVER_MINIMUM.get(int(torch.version.cuda.split(".")[0]), "?")
    raise SystemExit(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use this machine's GPUs: NVIDIA "
        f"driver {driver} is older than the {minimum} it needs. Update the driver, or use torch for CUDA "
        "12.6 (TORCH_CUDA=cu126: scripts/install_torch.sh, or the images' build argument)"
    )


def autodetect_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    # Pre-Ampere GPUs have no bf16 and fp16 needs a grad scaler: fp32 unless fp16 is asked for.
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return torch.bfloat16
    return torch.float32


def setup_runtime(device_name: str = "auto", dtype_name: str = "auto") -> Runtime:
    """Pick the device and dtype; under torchrun, join the process group (NCCL on GPUs, gloo on CPU)."""
    if device_name in ("auto", "cuda"):
        check_gpus_usable()
    device_type = autodetect_device() if device_name == "auto" else device_name
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device_type == "cuda" else "gloo", device_id=device if device_type == "cuda" else None
        )
    dtype = resolve_dtype(dtype_name, device)
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bfloat16_matmul():
        print0(SLOW_BFLOAT16)
    return Runtime(device, dtype, rank, local_rank, world_size)


SLOW_BFLOAT16 = (
    "warning: this CPU has no native bfloat16 matmul (AVX-512 or AMX), so bfloat16 runs through a scalar "
    "fallback, tens of times slower than float32 (a matmul ~60x on an AVX2 EPYC): pass --dtype float32"
)


def cpu_has_bfloat16_matmul() -> bool:
    """Whether oneDNN runs bf16 matmuls natively here; without it torch uses a scalar loop."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


COMPILER_HELP = (
    "install a C/C++ compiler and Python's headers (Debian/Ubuntu: apt-get install gcc g++ python3-dev) "
    "or pass --no-compile"
)


def compile_model(model: torch.nn.Module, requested: bool | None, runtime: Runtime) -> torch.nn.Module:
    """The model torch.compile'd when asked (default: on CUDA), once this machine has proved it can build
    kernels: inductor needs a C++ compiler on CPU, Triton a C compiler on GPUs, and both need Python's
    headers. Without them the first training step would die in a compiler traceback in the middle of a
    job; this fails before training, in one line that says what to do."""
    if not (requested if requested is not None else runtime.device.type == "cuda"):
        return model
    check_compiler(runtime.device)
    return torch.compile(model, dynamic=False)


def check_compiler(device: torch.device) -> None:
    """SystemExit with one line unless torch.compile can build a kernel for `device` here."""
    variable, names, language = (
        ("CC", ("gcc", "clang"), "C") if device.type == "cuda" else ("CXX", ("g++", "clang++"), "C++")
    )
    candidates = [os.environ[variable]] if os.environ.get(variable) else names
    if not any(shutil.which(name) for name in candidates):
        looked = f"${variable}" if os.environ.get(variable) else ", ".join(names)
        raise SystemExit(f"--compile: no {language} compiler found (looked for {looked}): {COMPILER_HELP}")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        raise SystemExit(f"--compile: Python's headers (Python.h) are missing: {COMPILER_HELP}")
    start = time.perf_counter()
    try:  # a trial kernel: whatever else is missing shows up here, not at the first step
        trial = torch.compile(lambda x: torch.relu(x) * 2, dynamic=False)
        trial(torch.ones(8, device=device)).sum().item()
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise SystemExit(
            f"--compile: torch.compile cannot build kernels here ({reason}): {COMPILER_HELP}"
        ) from None
    print0(f"torch.compile: a trial kernel built in {time.perf_counter() - start:.1f}s")


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


_measured_cpu_peak: dict[torch.dtype, float] = {}


def peak_flops(runtime: Runtime) -> tuple[float, str]:
    """Per-device peak FLOP/s for MFU, and where the number comes from."""
    if runtime.device.type == "cuda":
        name = torch.cuda.get_device_name(runtime.device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                scale = 1.0 if runtime.dtype in (torch.bfloat16, torch.float16) else 0.5
                return flops * scale, f"{name} data sheet"
        return float("nan"), f"{name}: peak unknown"
    # CPUs publish no single peak: measure this machine's best large matmul in the compute dtype. CPUs
    # have no fast fp16 matmul (a 1024² one takes seconds): fp16 runs are measured against fp32's peak.
    dtype = torch.float32 if runtime.dtype == torch.float16 else runtime.dtype
    if dtype not in _measured_cpu_peak:
        a = torch.randn(1024, 1024, dtype=dtype)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - start)
        _measured_cpu_peak[dtype] = 2 * 1024**3 / best
    name = str(dtype).removeprefix("torch.")
    return _measured_cpu_peak[dtype], f"measured {runtime.device.type} {name} matmul peak"


class StopRequest:
    """SIGTERM or Ctrl-C: checkpoint at the end of the current step, then stop; a second signal stops now.
    Output that can no longer be delivered (the worker reading it died) does not stop the checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.handle)
        sys.stdout, sys.stderr = SurvivesBrokenPipe(sys.stdout), SurvivesBrokenPipe(sys.stderr)

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print0(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping")


class EvalStopped(Exception):
    """A stop request came during an evaluation: it ends unfinished, on every process alike."""


T = TypeVar("T")


def until_stopped(items: Iterable[T], stop: StopRequest | None) -> Iterator[T]:
    """An evaluation's items, until a stop request (looked at before each item). Then call
    end_if_stopped, before the evaluation's own collectives."""
    for item in items:
        if stop is not None and stop.requested:
            return
        yield item


def end_if_stopped(stop: StopRequest | None, device: torch.device) -> None:
    """Raise EvalStopped on every process if a stop came to any during the evaluation: one all-reduce
    when distributed, so every process takes the same branch (one that left its loop early and one that
    did not would otherwise meet in different collectives)."""
    if stop is None:
        return
    requested = torch.tensor(int(stop.requested), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(requested, op=dist.ReduceOp.MAX)
    if requested.item():
        raise EvalStopped


class SurvivesBrokenPipe:
    """A text stream whose reader may go away: the first write that finds the pipe broken points the
    file descriptor at /dev/null, so later writes (and the flush at exit) succeed and go nowhere."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.discard()
            return self.stream.write(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.discard()
            self.stream.flush()

    def discard(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class NullWandb:
    """Stands in for a wandb run when wandb is off, so the loop calls log() unconditionally."""

    def log(self, data: dict, step: int | None = None) -> None:
        pass

    def finish(self) -> None:
        pass


def init_wandb(settings: TrainerSettings, run: str, config: dict, runtime: Runtime) -> Any:
    """A wandb run named after the run when WANDB_API_KEY is set (rank 0 only); a NullWandb otherwise."""
    if not runtime.is_master or settings.wandb_api_key is None:
        return NullWandb()
    try:
        import wandb
    except ImportError as error:
        raise SystemExit("WANDB_API_KEY is set but wandb is not installed: pip install wandb") from error
    wandb.login(key=settings.wandb_api_key.get_secret_value())
    return wandb.init(project=settings.wandb_project, name=run, config=config)
