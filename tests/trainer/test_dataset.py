"""Pretraining shards: the train/val split, and downloads that are whole, retried and resumable."""

import hashlib
import random
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from trainer import dataset
from trainer.download import fetch
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer

from conftest import MirrorHandler, http_mirror, make_documents, write_shards
from support import free_port


def test_last_shard_is_validation(tiny_kit: TrainerSettings) -> None:
    assert [p.name for p in dataset.list_shards(tiny_kit, "train")] == [
        f"shard_0000{i}.parquet" for i in range(3)
    ]
    assert [p.name for p in dataset.list_shards(tiny_kit, "val")] == ["shard_00003.parquet"]
    assert len(list(dataset.iter_texts(dataset.list_shards(tiny_kit, "val")))) == 8


def test_doc_cap_crops_documents(tiny_kit: TrainerSettings) -> None:
    assert max(map(len, dataset.iter_texts(dataset.list_shards(tiny_kit, "train"), doc_cap=50))) == 50


@pytest.mark.parametrize("data_dir", [True, False])
def test_missing_shards_error_says_what_to_do(tmp_path: Path, data_dir: bool) -> None:
    settings = TrainerSettings(base_dir=tmp_path, data_dir=tmp_path / "kit" if data_dir else None)
    hint = "NANOCHAT_DATA_DIR must point" if data_dir else r"python -m trainer\.dataset"
    with pytest.raises(FileNotFoundError, match=hint):
        dataset.list_shards(settings, "train")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A remote dataset's files: shards 0..5, the last (5) being its validation shard."""
    folder = tmp_path / "remote"
    write_shards(folder, [make_documents(8, seed=i) for i in range(6)])
    return folder


def settings_for(tmp_path: Path, source_url: str) -> TrainerSettings:
    return TrainerSettings(base_dir=tmp_path / "base", pretrain_url=source_url, pretrain_last_shard=5)


def test_download_from_a_local_folder_fetches_train_shards_and_the_val_shard(
    tmp_path: Path, source: Path
) -> None:
    settings = settings_for(tmp_path, str(source))
    dataset.download_shards(settings, num_train=2)
    fetched = sorted(p.name for p in (tmp_path / "base" / "data" / "pretrain").iterdir())
    assert fetched == ["shard_00000.parquet", "shard_00001.parquet", "shard_00005.parquet"]
    assert dataset.list_shards(settings, "val")[0].name == "shard_00005.parquet"


def test_download_resumes_without_fetching_present_shards_again(tmp_path: Path, source: Path) -> None:
    settings = settings_for(tmp_path, str(source))
    dataset.download_shards(settings, num_train=1)
    first = tmp_path / "base" / "data" / "pretrain" / "shard_00000.parquet"
    before = first.stat().st_mtime_ns
    (source / "shard_00000.parquet").unlink()  # the source no longer has it: a re-fetch would fail
    dataset.download_shards(settings, num_train=3)
    assert first.stat().st_mtime_ns == before
    assert len(dataset.list_shards(settings, "train")) == 3


class FlakyServer(MirrorHandler):
    """The first request for each file gets a truncated body, like a dropped connection."""

    def do_GET(self) -> None:
        path = Path(self.directory) / self.path.lstrip("/")
        if not path.exists() or self.path.lstrip("/") in self.requested:
            return super().do_GET()
        self.requested.append(self.path.lstrip("/"))
        data = path.read_bytes()[: path.stat().st_size // 2]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def http_source(source: Path) -> Iterator[str]:
    with http_mirror(source, FlakyServer) as (url, _):
        yield url


def test_http_download_retries_truncated_files_and_keeps_only_whole_ones(
    tmp_path: Path, http_source: str
) -> None:
    settings = settings_for(tmp_path, http_source)
    dataset.download_shards(settings, num_train=2, backoff_s=0.01)
    folder = tmp_path / "base" / "data" / "pretrain"
    assert sorted(p.name for p in folder.iterdir()) == [
        "shard_00000.parquet",
        "shard_00001.parquet",
        "shard_00005.parquet",
    ]
    for path in folder.iterdir():
        assert pq.read_table(path).num_rows == 8


class DroppingServer(MirrorHandler):
    """Each file's first answer drops its connection halfway through the length it promised; later
    answers honour `Range: bytes=N-` while `If-Range` names the file's ETag, as the datasets' hosts
    do. After the first answer the file becomes `next_version`, if there is one. Notes the ranges asked
    for and the bytes sent."""

    ranges: list[str | None]
    bytes_sent: list[int]
    next_version: bytes | None = None

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        path = Path(self.directory) / name
        data = path.read_bytes()
        etag = f'"{hashlib.sha256(data).hexdigest()[:16]}"'
        asked = self.headers.get("Range")
        same_version = self.headers.get("If-Range") in (None, etag)
        start = int(asked.removeprefix("bytes=").removesuffix("-")) if asked and same_version else 0
        first = name not in self.requested
        self.requested.append(name)
        self.ranges.append(asked)
        body = data[start:][: (len(data) - start) // 2] if first else data[start:]
        self.bytes_sent.append(len(body))
        self.send_response(206 if start else 200)
        self.send_header("ETag", etag)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True
        if first and self.next_version is not None:
            path.write_bytes(self.next_version)


def fetch_through(handler: type[DroppingServer], data: bytes, folder: Path) -> bytes:
    """`data` served as big.bin by `handler`, fetched: the bytes that arrive."""
    (folder / "served").mkdir()
    (folder / "served" / "big.bin").write_bytes(data)
    with http_mirror(folder / "served", handler) as (url, requested):
        fetch(f"{url}/big.bin", folder / "got" / "big.bin", backoff_s=0.01)
    assert requested == ["big.bin", "big.bin"] and handler.ranges[0] is None
    assert [p.name for p in (folder / "got").iterdir()] == ["big.bin"]  # no temp file left
    return (folder / "got" / "big.bin").read_bytes()


def test_an_http_download_cut_short_asks_for_the_rest_only(tmp_path: Path) -> None:
    data = random.Random(0).randbytes(1_000_000)  # many chunks: what came before the drop is on disk
    handler = type("Dropping", (DroppingServer,), {"ranges": [], "bytes_sent": []})
    assert fetch_through(handler, data, tmp_path) == data
    kept = int(handler.ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < kept <= len(data) // 2 and handler.bytes_sent[1] == len(data) - kept


def test_a_file_that_changed_between_attempts_is_fetched_whole_again(tmp_path: Path) -> None:
    new = random.Random(1).randbytes(1_000_000)
    handler = type("Dropping", (DroppingServer,), {"ranges": [], "bytes_sent": [], "next_version": new})
    assert fetch_through(handler, random.Random(0).randbytes(1_000_000), tmp_path) == new
    assert handler.ranges[1] is not None and handler.bytes_sent[1] == len(new)  # the rest asked, all sent


def test_a_truncated_archive_is_fetched_again_whatever_its_check_raises(tmp_path: Path) -> None:
    """zipfile's BadZipFile is no ValueError: the eval bundle's check must still count as a retry."""
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "bundle.zip", "w") as archive:
        archive.writestr("eval/data.jsonl", random.Random(0).randbytes(50_000))
    with http_mirror(served, FlakyServer) as (url, requested):
        fetch(f"{url}/bundle.zip", tmp_path / "got" / "bundle.zip", check=zipfile.ZipFile, backoff_s=0.01)
    assert requested == ["bundle.zip", "bundle.zip"]
    assert zipfile.ZipFile(tmp_path / "got" / "bundle.zip").namelist() == ["eval/data.jsonl"]


def test_a_download_that_keeps_failing_leaves_no_partial_file(tmp_path: Path, source: Path) -> None:
    settings = TrainerSettings(base_dir=tmp_path / "base", pretrain_url=str(source), pretrain_last_shard=99)
    with pytest.raises(RuntimeError, match="could not fetch"):
        dataset.download_shards(settings, num_train=1, backoff_s=0.0)
    assert sorted(p.name for p in (tmp_path / "base" / "data" / "pretrain").iterdir()) == [
        "shard_00000.parquet"
    ]


def test_a_local_kit_is_never_downloaded_into(tiny_kit: TrainerSettings) -> None:
    with pytest.raises(RuntimeError, match="read as is"):
        dataset.download_shards(tiny_kit, num_train=1)


def per_shard_tokens(path: Path, tokenizer: Tokenizer) -> float:
    return dataset.estimate_chars([path]) / dataset.bytes_per_token(path, tokenizer)


def test_a_plan_past_the_shards_on_disk_fetches_the_first_now_and_the_rest_in_the_background(
    tmp_path: Path, source: Path, tiny_tokenizer: Tokenizer, capsys: pytest.CaptureFixture
) -> None:
    three_shards = (
        2.5 * per_shard_tokens(source / "shard_00000.parquet", tiny_tokenizer) / dataset.CROP_ALLOWANCE
    )
    folder = tmp_path / "base" / "data" / "pretrain"
    with http_mirror(source) as (url, requested):
        settings = settings_for(tmp_path, url)
        plan = dataset.plan_training_shards(settings, tiny_tokenizer, planned_tokens=int(three_shards))
        assert [p.name for p in plan.shards] == [f"shard_0000{i}.parquet" for i in range(3)]
        # Before training: the first shard, the val shard and the first missing one (it proves the source).
        assert requested == ["shard_00000.parquet", "shard_00005.parquet", "shard_00001.parquet"]
        assert plan.missing == ["shard_00002.parquet"] and not (folder / "shard_00002.parquet").exists()
        download = dataset.ShardDownload(settings, plan.missing)
        dataset.wait_for_shard(folder / "shard_00002.parquet", download)
    assert pq.read_table(folder / "shard_00002.parquet").num_rows == 8
    assert f"data: 3 training shards for {int(three_shards):,} planned tokens" in capsys.readouterr().out


def test_offline_a_run_trains_on_the_shards_there_are_and_says_how_often_it_repeats_them(
    tmp_path: Path,
    source: Path,
    tiny_tokenizer: Tokenizer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    dataset.download_shards(settings_for(tmp_path, str(source)), num_train=2)  # shards 0, 1 and val 5
    monkeypatch.setattr(dataset, "DOWNLOAD_BACKOFF_S", 0.0)
    offline = settings_for(tmp_path, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    one_shard = per_shard_tokens(source / "shard_00000.parquet", tiny_tokenizer) / dataset.CROP_ALLOWANCE
    plan = dataset.plan_training_shards(offline, tiny_tokenizer, planned_tokens=int(8 * one_shard))
    assert [p.name for p in plan.shards] == [
        "shard_00000.parquet",
        "shard_00001.parquet",
    ] and not plan.missing
    out = capsys.readouterr().out
    assert "(cannot download: could not fetch http://127.0.0.1:" in out
    passes = re.search(r"about ([\d.]+) passes over it: the run repeats data", out)
    assert passes and 3 < float(passes.group(1)) < 5  # 8 shards' worth planned over 2


def test_a_local_corpus_too_small_for_the_plan_says_so(
    tiny_kit: TrainerSettings, tiny_tokenizer: Tokenizer, capsys: pytest.CaptureFixture
) -> None:
    plan = dataset.plan_training_shards(tiny_kit, tiny_tokenizer, planned_tokens=10_000_000)
    assert len(plan.shards) == 3 and not plan.missing
    assert "the run repeats data" in capsys.readouterr().out


def test_a_shard_that_cannot_be_downloaded_stops_the_run_when_it_is_needed(
    tmp_path: Path, source: Path
) -> None:
    settings = settings_for(tmp_path, str(source))
    download = dataset.ShardDownload(settings, ["shard_00042.parquet"], backoff_s=0.0)  # the source lacks it
    with pytest.raises(RuntimeError, match=r"retry the job .* or train on local data"):
        dataset.wait_for_shard(tmp_path / "base" / "data" / "pretrain" / "shard_00042.parquet", download)
