"""Tiny fixtures in the real schemas, so the trainer's unit tests need no data kit."""

import http.server
import random
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer import tok_train
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer

SYLLABLES = ["ka", "to", "mi", "ne", "ru", "sa", "li", "po", "de", "fu", "gra", "sht", "ber", "qua"]
EXTRAS = [
    "über",
    "naïve",
    "café",
    "東京",
    "привет",
    "🚀",
    "def",
    "return",
    "print()",
    "{}",
    "==",
    "42",
    "1024",
    "3.14",
]


def random_word(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return rng.choice(EXTRAS)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4)))


def make_documents(count: int, seed: int = 0) -> list[str]:
    """Documents of very different lengths (10 to ~3,000 words), each starting with a unique tag."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        length = rng.choice([10, 40, 120, 400, 3000]) + rng.randrange(10)
        docs.append(f"doc{i:04d}: " + " ".join(random_word(rng) for _ in range(length)))
    return docs


def write_shards(folder: Path, docs_per_shard: list[list[str]], row_group_size: int = 4) -> list[Path]:
    """Parquet shards like the real ones: one `text` column, several row groups each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, docs in enumerate(docs_per_shard):
        path = folder / f"shard_{i:05d}.parquet"
        pq.write_table(pa.table({"text": docs}), path, row_group_size=row_group_size, compression="zstd")
        paths.append(path)
    return paths


def write_pretraining_kit(data_dir: Path, seed: int) -> None:
    """A data kit with just enough pretraining text for a few steps of a tiny model: 3 shards, the last
    one the validation shard."""
    documents = make_documents(60, seed=seed)
    write_shards(data_dir / "pretrain", [documents[:20], documents[20:40], documents[40:]])


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train(make_documents(200, seed=1), vocab_size=600)


@pytest.fixture(scope="session")
def kit_base(data_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base dir whose run 'r' has a tokenizer (vocab 2048) trained on the data kit."""
    base = tmp_path_factory.mktemp("kit-base")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NANOCHAT_BASE_DIR", str(base))
        patch.setenv("NANOCHAT_DATA_DIR", str(data_kit))
        tok_train.main(["--run", "r", "--vocab-size", "2048"])
    return base


def copy_tokenizer(base: Path, run: str) -> None:
    """Give `run` the kit tokenizer of run 'r'."""
    source, target = base / "runs" / "r" / "tokenizer", base / "runs" / run / "tokenizer"
    shutil.copytree(source, target, dirs_exist_ok=True)


@pytest.fixture
def env(kit_base: Path, data_kit: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Programs run in this test read kit_base and the data kit."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(kit_base))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(data_kit))
    return kit_base


@pytest.fixture
def tiny_kit(tmp_path: Path) -> TrainerSettings:
    """A data root with 3 train shards of 12 docs (3 row groups each) and a val shard."""
    docs = make_documents(44)
    write_shards(tmp_path / "kit" / "pretrain", [docs[0:12], docs[12:24], docs[24:36], docs[36:44]])
    return TrainerSettings(base_dir=tmp_path / "base", data_dir=tmp_path / "kit")


class MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder as a dataset's download URL does, and notes each path asked for."""

    requested: list[str]

    def do_GET(self) -> None:
        self.requested.append(self.path.lstrip("/"))
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@contextmanager
def http_mirror(
    folder: Path, handler: type[MirrorHandler] = MirrorHandler
) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server on a free port serving `folder`: its base URL, and the file names requested."""
    handler = type("Handler", (handler,), {"requested": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requested
    finally:
        server.shutdown()
        server.server_close()
