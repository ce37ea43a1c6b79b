"""Small helpers every trainer program shares: run names, banners, atomic files, progress bars."""

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
