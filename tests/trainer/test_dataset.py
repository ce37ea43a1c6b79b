"""Pretraining shards: the train/val split, and downloads that are whole, retried and resumable."""

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from trainer import dataset
from trainer.settings import TrainerSettings

from conftest import make_documents, write_shards


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


class FlakyServer(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; the first request for each file gets a truncated body, like a dropped connection."""

    served: set[str]

    def do_GET(self) -> None:
        path = Path(self.directory) / self.path.lstrip("/")
        if not path.exists():
            self.send_error(404)
            return
        data = path.read_bytes()
        if self.path not in self.served:
            self.served.add(self.path)
            data = data[: len(data) // 2]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_source(source: Path) -> Iterator[str]:
    handler = type("Handler", (FlakyServer,), {"served": set()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(source)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


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
