"""
Robust file downloads: from an http(s) URL or a local folder, retried with exponential backoff,
written to a temp file that must pass a check before it is renamed into place. A destination file
therefore exists only whole, and a download that is interrupted resumes by fetching what is missing:
whole files a later run finds in place, and within a file, the bytes after those that came before an
HTTP connection dropped (a `Range` request, which the datasets' hosts answer).
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
    `check(tmp_path)` raises (any exception) when the bytes are not what was expected; `cancel`, once
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
                download_rest(source, tmp, cancel)
            else:
                shutil.copyfile(Path(source).expanduser(), tmp)
            if check is not None:
                try:
                    check(tmp)
                except Exception as error:  # the check's own way of saying these are not the file's bytes
                    tmp.unlink()  # the next attempt starts over
                    raise ValueError(f"not the whole file ({error.__class__.__name__}: {error})") from error
            tmp.replace(dest)
            return dest
        except (OSError, requests.RequestException, ValueError) as error:
            # what a dropped connection left in tmp stays: the next attempt asks for the rest
            if attempt == attempts:
                tmp.unlink(missing_ok=True)
                raise RuntimeError(f"could not fetch {source}: {error}") from error
            wait = backoff_s * 2 ** (attempt - 1)
            print(
                f"{dest.name}: attempt {attempt}/{attempts} failed ({error}); retrying in {wait:.0f}s",
                flush=True,
            )
            if (cancel or threading.Event()).wait(wait):  # the pause before the next try, unless told to stop
                tmp.unlink(missing_ok=True)
                raise Cancelled(source) from error
        except Cancelled:
            tmp.unlink(missing_ok=True)
            raise
    raise AssertionError("unreachable")


def download_rest(url: str, tmp: Path, cancel: threading.Event | None) -> None:
    """Into tmp, after the bytes an earlier attempt left there: a server that answers the range (206)
    sends only the rest; any other answer is the whole file, written over them."""
    have = tmp.stat().st_size if tmp.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with requests.get(url, stream=True, timeout=60, headers=headers) as response:
        if response.status_code == 416:  # no bytes past those: they cannot be the start of this file
            tmp.unlink()
        response.raise_for_status()
        content_range = response.headers.get("Content-Range", "")
        rest = response.status_code == 206 and content_range.startswith(f"bytes {have}-")
        with open(tmp, "ab" if have and rest else "wb") as f:
            for chunk in response.iter_content(chunk_size=1 << 16):  # written as it comes: kept if cut
                if cancel is not None and cancel.is_set():
                    raise Cancelled(url)
                f.write(chunk)


def join(base: str, name: str) -> str:
    """base URL or folder + file name."""
    return (
        f"{base.rstrip('/')}/{name}" if base.startswith(("http://", "https://")) else str(Path(base) / name)
    )
