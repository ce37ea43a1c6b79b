"""
Robust file downloads: from an http(s) URL or a local folder, retried with exponential backoff,
written to a temp file that must pass a check before it is renamed into place. A destination file
therefore exists only whole, and a download that is interrupted resumes by fetching what is missing.
"""

import os
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import requests


class Cancelled(Exception):
    """The download was told to stop (its program is ending)."""


def fetch(
    source: str,
    dest: Path,
    check: Callable[[Path], object] | None = None,
    attempts: int = 5,
    backoff_s: float = 2.0,
    cancel: threading.Event | None = None,
) -> Path:
    """
    Copy `source` (a URL, or a path to a local file) to `dest` unless dest already exists.
    `check(tmp_path)` raises (ValueError/OSError) when the bytes are not what was expected; `cancel`, once
    set, stops an HTTP download between chunks (Cancelled). The temp file's name is this process's own,
    so processes fetching the same file into shared storage never write into each other's.
    """
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}.tmp")
    for attempt in range(1, attempts + 1):
        try:
            if source.startswith(("http://", "https://")):
                with requests.get(source, stream=True, timeout=60) as response:
                    response.raise_for_status()
                    with open(tmp, "wb") as f:
                        for chunk in response.iter_content(chunk_size=1 << 20):
                            if cancel is not None and cancel.is_set():
                                raise Cancelled(source)
                            f.write(chunk)
            else:
                shutil.copyfile(Path(source).expanduser(), tmp)
            if check is not None:
                check(tmp)
            tmp.replace(dest)
            return dest
        except (OSError, requests.RequestException, ValueError) as error:
            tmp.unlink(missing_ok=True)
            if attempt == attempts:
                raise RuntimeError(f"could not fetch {source}: {error}") from error
            wait = backoff_s * 2 ** (attempt - 1)
            print(
                f"{dest.name}: attempt {attempt}/{attempts} failed ({error}); retrying in {wait:.0f}s",
                flush=True,
            )
            if (cancel or threading.Event()).wait(wait):  # the pause before the next try, unless told to stop
                raise Cancelled(source) from error
        except Cancelled:
            tmp.unlink(missing_ok=True)
            raise
    raise AssertionError("unreachable")


def join(base: str, name: str) -> str:
    """base URL or folder + file name."""
    return (
        f"{base.rstrip('/')}/{name}" if base.startswith(("http://", "https://")) else str(Path(base) / name)
    )
