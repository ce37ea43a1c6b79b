"""
Uploaded files as the API keeps them: $NANOCHAT_BASE_DIR/files/<id>/, in the layout the trainer reads
(services/trainer/trainer/user_files.py). The API writes the upload's bytes under names of its own
(part-000.jsonl, …) and file.json; the validation job (trainer.validate_file) writes report.json and
data/. A file's status follows from them:

    validating ─(its validation job finds no problem)→ ready
    validating ─(it finds one, or the job fails)→ invalid    (kept for inspection, never trained on)

A job may name a file only while it is ready (`check_usable`), and a file is deleted only while no active
job names it, directly or through an uploaded mixture (`users`).
"""

import json
import re
import shutil
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from redis import Redis

from jobs import records
from jobs.records import JobRecord
from jobs.specs import FILE_ID_PATTERN, JobSpec, PipelineJob, ValidateFileJob

FILE_ID = re.compile(FILE_ID_PATTERN)
Purpose = Literal["conversations", "pretrain", "mixture", "questions"]
# The kinds of upload each purpose takes, by their name's suffix.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "conversations": (".jsonl",),
    "pretrain": (".parquet", ".jsonl", ".txt", ".md"),
    "mixture": (".yaml", ".yml"),
    "questions": (".jsonl",),
}
SEVERAL_PARTS = {"pretrain"}  # a corpus may come as a folder's files, in one upload


class Unusable(Exception):
    """A job names a file that it cannot use now (HTTP 409)."""


class Part(BaseModel):
    name: str  # the uploader's name for it, shown, never used as a path
    stored: str  # ours: part-000.jsonl
    bytes: int


class Upload(BaseModel):
    """file.json: what was uploaded, how to validate it, and the job that does."""

    id: str
    purpose: Purpose
    parts: list[Part]
    bytes: int
    created_at: datetime
    tokenizer: str | None  # the run whose tokenizer counts the tokens
    val_fraction: float
    max_tokens: int
    job_id: str | None = None


class Problem(BaseModel):
    part: str
    line: int | None  # a parquet file's row; None where the problem is the whole part's
    reason: str


class FileRecord(Upload):
    status: Literal["validating", "ready", "invalid"]
    error: str | None = None  # why the validation job did not finish
    stats: dict[str, Any] | None = None  # rows, tokens, length histogram, roles…
    problems: list[Problem] = []
    problems_total: int = 0
    samples: list[Any] = []  # a few rows: conversations as messages, a corpus's documents as text


def files_dir(base_dir: Path) -> Path:
    return base_dir.expanduser() / "files"


def new_id() -> str:
    return f"file-{uuid.uuid4().hex[:24]}"


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def write_upload(folder: Path, upload: Upload) -> None:
    """file.json, replaced whole (the validation job may read it meanwhile)."""
    tmp = folder / ".file.json.tmp"
    tmp.write_text(upload.model_dump_json(indent=2), encoding="utf-8")
    tmp.replace(folder / "file.json")


def load(redis: Redis, base_dir: Path, file_id: str) -> FileRecord | None:
    folder = files_dir(base_dir) / file_id
    upload = read_json(folder / "file.json") if FILE_ID.fullmatch(file_id) else None
    if upload is None:
        return None
    report = read_json(folder / "report.json")
    if report is not None:
        return FileRecord(**upload, **report)
    job = records.load(redis, upload["job_id"]) if upload.get("job_id") else None
    if job is None or job.is_active:
        return FileRecord(**upload, status="validating")
    return FileRecord(
        **upload, status="invalid", error=f"the validation job {job.status}: {job.error or 'no report'}"
    )


def list_all(redis: Redis, base_dir: Path) -> list[FileRecord]:
    """Every file, newest first."""
    folder = files_dir(base_dir)
    ids = [p.name for p in folder.iterdir() if FILE_ID.fullmatch(p.name)] if folder.is_dir() else []
    found = [record for file_id in ids if (record := load(redis, base_dir, file_id))]
    return sorted(found, key=lambda record: record.created_at, reverse=True)


def named_files(value: Any) -> set[str]:
    """The file ids anywhere in a job's config."""
    if isinstance(value, str):
        return {value} if FILE_ID.fullmatch(value) else set()
    if isinstance(value, dict):
        return set().union(*map(named_files, value.values()))
    if isinstance(value, list):
        return set().union(*map(named_files, value))
    return set()


def with_mixtures(redis: Redis, base_dir: Path, ids: set[str]) -> set[str]:
    """The ids and, for each mixture among them, the files it names."""
    named = set(ids)
    for file_id in ids:
        record = load(redis, base_dir, file_id)
        if record is not None and record.purpose == "mixture" and record.stats:
            named |= set(record.stats.get("files", []))
    return named


def check_usable(redis: Redis, base_dir: Path, spec: JobSpec) -> None:
    """Refuse (Unusable) a job that names a file not ready, or a mixture naming one. A validation job
    validates its file whatever its status."""
    if isinstance(spec, ValidateFileJob):
        if load(redis, base_dir, spec.config.file) is None:
            raise Unusable(f"no uploaded file {spec.config.file}")
        return
    configs = [s.config for s in spec.stages()] if isinstance(spec, PipelineJob) else [spec.config]
    named = set().union(*(named_files(c.model_dump(mode="json")) for c in configs))
    for file_id in sorted(with_mixtures(redis, base_dir, named)):
        record = load(redis, base_dir, file_id)
        if record is None:
            raise Unusable(f"no uploaded file {file_id}")
        if record.status != "ready":
            raise Unusable(f"file {file_id} is {record.status}: a job can use it once it is ready")


def users(redis: Redis, base_dir: Path, file_id: str) -> Iterator[JobRecord]:
    """Active jobs that name the file, directly or through a mixture."""
    for record in records.iter_records(redis):
        named = named_files(record.config) if record.is_active and record.kind != "pipeline" else set()
        if file_id in with_mixtures(redis, base_dir, named):
            yield record


def delete(redis: Redis, base_dir: Path, file_id: str) -> bool:
    """Remove the file's folder (upload, report, prepared data). False: no such file; Unusable while an
    active job names it."""
    if load(redis, base_dir, file_id) is None:
        return False
    if busy := next(users(redis, base_dir, file_id), None):
        raise Unusable(f"job {busy.id} ({busy.kind}, {busy.status}) uses file {file_id}: stop it first")
    shutil.rmtree(files_dir(base_dir) / file_id)
    return True


def validation_job(upload: Upload) -> ValidateFileJob:
    """The job that validates an upload, with its run's tokenizer (else run `default`'s, if any)."""
    config = {"file": upload.id, "val_fraction": upload.val_fraction, "max_tokens": upload.max_tokens}
    return ValidateFileJob(kind="validate_file", run=upload.tokenizer or "default", config=config)
