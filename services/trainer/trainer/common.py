"""Small helpers every trainer program shares: flag types, banners, atomic files, progress bars."""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainer.settings import TrainerSettings

# A run name becomes a folder name and a wandb run name: keep it to one safe path component.
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def run_name(value: str) -> str:
    """argparse type for --run: refuses names that could escape the runs folder."""
    if not RUN_NAME_PATTERN.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"invalid run name {value!r}: use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
        )
    return value


@dataclass(frozen=True)
class Bounded:
    """argparse type for a number within bounds (None: no bound on that side), named as JSON Schema names
    them. The API's job configs (services/jobs/jobs/specs.py) bound each flag the same; a test checks it."""

    kind: type[int] | type[float]
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {self.kind.__name__} value: {text!r}") from None
        if not self.admits(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {self.range_text()}")
        return value

    def admits(self, value: float) -> bool:
        return (
            (self.minimum is None or value >= self.minimum)
            and (self.exclusive_minimum is None or value > self.exclusive_minimum)
            and (self.maximum is None or value <= self.maximum)
        )

    def range_text(self) -> str:
        limits = (("≥", self.minimum), (">", self.exclusive_minimum), ("≤", self.maximum))
        return " and ".join(f"{sign} {limit}" for sign, limit in limits if limit is not None)


# Bounds several flags share (jobs/specs.py has them too, named alike).
MAX_STEPS = 10_000_000
STEP_COUNT = Bounded(int, 1, MAX_STEPS)
EVERY_N_STEPS = Bounded(int, -1, MAX_STEPS)  # and at the end; 0: only at the end; -1: off (eval_budget.py)
LEARNING_RATE = Bounded(float, 0, 10)  # 0 freezes the group
FRACTION = Bounded(float, 0, 1)
BATCH_SIZE = Bounded(int, 1, 4096)  # rows per forward pass
SEED = Bounded(int, 0, 2**31 - 1)
CHECKPOINT_STEP = Bounded(int, 0)
EVAL_TOKENS = Bounded(int, 1, 2**34)
PER_TASK = Bounded(int, -1, 1_000_000)  # problems evaluated per task; -1 (or 0): all
# Sampling replies (chat_rl, chat_eval)
SAMPLES = Bounded(int, 1, 1024)  # replies per question
NEW_TOKENS = Bounded(int, 1, 65536)  # tokens per reply
TEMPERATURE = Bounded(float, 0, 10)  # 0: greedy
TOP_K = Bounded(int, 1, 1_000_000)


def add_run_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run",
        type=run_name,
        default="default",
        help="run name: outputs go to $NANOCHAT_BASE_DIR/runs/RUN/ (default: 'default')",
    )


def print0(*args: Any, **kwargs: Any) -> None:
    """print on rank 0 only, so a multi-GPU run logs each line once."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def git_commit() -> str:
    """The code version for run logs: the commit hash, with '-dirty' when there are local changes."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty.stdout.strip() else "")


def print_banner(program: str, args: argparse.Namespace, settings: TrainerSettings) -> None:
    """A run's log starts with its config, the code version and the hardware."""
    print0(f"== {program} | code {git_commit()} | python {platform.python_version()} | {platform.machine()}")
    print0(f"   base dir: {settings.base_dir.expanduser()}")
    print0(f"   data dir: {settings.data_root}" + ("" if settings.data_dir else " (downloads)"))
    for name, value in sorted(vars(args).items()):
        print0(f"   --{name.replace('_', '-')} = {value}")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, then rename: readers see the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide the file from other services
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(beside: Path) -> Path:
    """A fresh folder next to `beside` (same filesystem, so it can be renamed into place), umask perms."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=beside.parent, prefix=f".{beside.name}.tmp-"))
    tmp.chmod(0o777 & ~current_umask())
    return tmp


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """tqdm on a terminal; in a job log (a pipe) a line every 30 s instead of a redraw every 0.1 s."""
    interactive = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 0.1 if interactive else 30.0)
    kwargs.setdefault("disable", int(os.environ.get("RANK", "0")) != 0)
    return tqdm(iterable, dynamic_ncols=interactive, **kwargs)


def replace_dir(new: Path, dest: Path) -> None:
    """Move the finished folder `new` to `dest`, replacing an older one only once `new` is complete."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        new.rename(dest)
        shutil.rmtree(old)
    else:
        new.rename(dest)
