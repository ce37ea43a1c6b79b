"""
Robust file downloads: from an http(s) URL or a local folder, retried with exponential backoff,
written to a temp file that must pass a check before it is renamed into place. A destination file
therefore exists only whole, and a download that is interrupted resumes by fetching what is missing:
whole files a later run finds in place, and within a file, the bytes after those that came before an
HTTP connection dropped (a `Range` request, which the datasets' hosts answer), while the file there
is still the version they came from (`If-Range`).
"""

import os
import re
import shutil
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


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
    tmp.unlink(missing_ok=True)  # an earlier process's, of whatever version: not to be continued
    partial = Partial(tmp)
    for attempt in range(1, attempts + 1):
        try:
            if source.startswith(("http://", "https://")):
                download_rest(source, partial, cancel)
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


@dataclass
class Partial:
    """The temp file an HTTP download writes, and the version of the file (its strong ETag, else its
    Last-Modified) that the bytes in it came from."""

    path: Path
    version: str | None = None


def download_rest(url: str, partial: Partial, cancel: threading.Event | None) -> None:
    """Into the temp file, after the bytes an earlier attempt left there: a server that still has their
    version sends the rest (206); any other answer is the whole file, written over them."""
    tmp = partial.path
    have = tmp.stat().st_size if tmp.exists() and partial.version else 0
    headers = {"Accept-Encoding": "identity"}  # a range counts the bytes as stored, not as unzipped
    if have:
        headers |= {"Range": f"bytes={have}-", "If-Range": partial.version}
    with requests.get(url, stream=True, timeout=60, headers=headers) as response:
        if response.status_code == 416:  # nothing past those bytes: start over
            tmp.unlink(missing_ok=True)
        response.raise_for_status()
        encoded = response.headers.get("Content-Encoding", "identity").lower() != "identity"
        etag = response.headers.get("ETag", "")
        version = etag if etag and not etag.startswith("W/") else response.headers.get("Last-Modified")
        partial.version = None if encoded else version  # unzipped bytes have no range to continue
        total = None if encoded else response.headers.get("Content-Length")
        if response.status_code == 206:
            answered = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
            if answered is None or int(answered[1]) != have:
                tmp.unlink(missing_ok=True)
                raise ValueError(f"asked for bytes from {have}, got {response.headers.get('Content-Range')}")
            total = answered[2]
        else:
            have = 0
        with open(tmp, "ab" if have else "wb") as f:
            for chunk in response.iter_content(chunk_size=1 << 16):  # written as it comes: kept if cut
                if cancel is not None and cancel.is_set():
                    raise Cancelled(url)
                f.write(chunk)
    if total is not None and total.isdigit() and tmp.stat().st_size != int(total):
        raise OSError(f"the connection ended after {tmp.stat().st_size} of {total} bytes")  # the rest next


def join(base: str, name: str) -> str:
    """base URL or folder + file name."""
    return (
        f"{base.rstrip('/')}/{name}" if base.startswith(("http://", "https://")) else str(Path(base) / name)
    )
