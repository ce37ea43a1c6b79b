"""
Files uploaded through the API (POST /files), as the programs read them. Each lives under a name of ours
(its id), never the uploader's, in $NANOCHAT_BASE_DIR/files/<id>/:

    file.json       the upload, written by the API: purpose, parts (the uploader's names, for display),
                    options, the validation job's id
    part-000.jsonl  the bytes as uploaded (a pretraining corpus may have several parts)
    report.json     the validation's outcome (trainer.validate_file): status ready or invalid, statistics,
                    every problem with its line
    data/           what training reads, put in place whole by a validation that found no problem:
                    train.jsonl and val.jsonl (conversations, questions), pretrain/shard_*.parquet (a
                    corpus; the last shard is its validation split) or mixture.yaml

A program reads data/ only while report.json says ready, so an invalid file is never half-used.
The API (services/jobs/jobs/files.py) writes file.json and reads report.json in this same layout.
"""

import argparse
import json
import re
from pathlib import Path
from typing import Any

from trainer.settings import TrainerSettings

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
PURPOSES = ("conversations", "pretrain", "mixture", "questions")


class UnusableFile(ValueError):
    """The file does not exist, is not (yet) ready, or is not of the purpose asked for."""


def file_id(value: str) -> str:
    """argparse type for a flag naming an uploaded file."""
    if not FILE_ID.fullmatch(value):
        raise argparse.ArgumentTypeError(f"invalid file id {value!r}: expected file- and 24 hex digits")
    return value


def file_dir(settings: TrainerSettings, file_id: str) -> Path:
    return settings.base_dir.expanduser() / "files" / file_id


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def ready_data(settings: TrainerSettings, file_id: str, purpose: str) -> Path:
    """data/ of a ready file of this purpose; UnusableFile says why there is none."""
    folder = file_dir(settings, file_id)
    upload = read_json(folder / "file.json") if FILE_ID.fullmatch(file_id) else None
    if upload is None:
        raise UnusableFile(f"no uploaded file {file_id}")
    if upload["purpose"] != purpose:
        raise UnusableFile(f"file {file_id} is a {upload['purpose']} file, not {purpose}")
    report = read_json(folder / "report.json") or {"status": "validating"}
    if report["status"] != "ready":
        raise UnusableFile(f"file {file_id} is {report['status']}, not ready")
    return folder / "data"


def corpus_dir(settings: TrainerSettings, file_id: str) -> Path:
    """An uploaded corpus's shards: the training shards and, last, its validation shard."""
    return ready_data(settings, file_id, "pretrain") / "pretrain"


def with_corpus(settings: TrainerSettings, file_id: str | None) -> TrainerSettings:
    """The settings of a program given --corpus: its shards are the uploaded corpus's."""
    if file_id is None:
        return settings
    try:
        return settings.with_corpus(corpus_dir(settings, file_id))
    except UnusableFile as error:
        raise SystemExit(f"--corpus: {error}") from error


def add_corpus_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--corpus",
        type=file_id,
        default=None,
        help="an uploaded pretraining corpus (its file id) instead of the pretraining shards (default: the "
        "shards of the data kit, or downloaded ones)",
    )


def split_path(settings: TrainerSettings, file_id: str, purpose: str, split: str) -> Path:
    """The train or val rows of a conversations or questions file (JSONL)."""
    if split not in ("train", "val"):
        raise UnusableFile(f"an uploaded file's split is train or val, not {split!r}")
    return ready_data(settings, file_id, purpose) / f"{split}.jsonl"


def mixture_path(settings: TrainerSettings, mixture: str) -> Path:
    """--mixture's value: an uploaded mixture's id, or a path (relative to the working directory)."""
    if FILE_ID.fullmatch(mixture):
        return ready_data(settings, mixture, "mixture") / "mixture.yaml"
    return Path(mixture)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a prepared split."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
