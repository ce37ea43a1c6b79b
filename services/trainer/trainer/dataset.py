"""
The pretraining corpus: parquet shards with one `text` column, the last shard (sorted by name) being
the validation split. The same layout is read from a local data kit (NANOCHAT_DATA_DIR/pretrain/) or
from the copy this module downloads into $NANOCHAT_BASE_DIR/data/pretrain/.

    python -m trainer.dataset -n 8     # shards 0..7 for training, plus the source's pinned val shard

base_train asks for the shards its planned tokens need (`plan_training_shards`): the first one and the
val shard are fetched before training starts, the rest in the background while it trains (the
reference's speedrun does this by hand, `dataset -n 170 &`). Offline, or on a local corpus, a run
trains on what there is and says how many passes over it the plan makes.
"""

import argparse
import atexit
import math
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from trainer.common import print0, progress_bar
from trainer.download import Cancelled, fetch, join
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer

# Each climbmix shard holds ~250M characters; used to size downloads from a character budget.
CHARS_PER_SHARD = 250_000_000


def shard_filename(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def pretrain_dir(settings: TrainerSettings) -> Path:
    return settings.pretrain_dir


def list_shards(settings: TrainerSettings, split: str) -> list[Path]:
    """Train shards (all but the last) or the val shard (the last), in name order."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', not {split!r}"
    folder = pretrain_dir(settings)
    shards = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if len(shards) < 2:
        hint = (
            "run `python -m trainer.dataset -n 8` to download them"
            if settings.shard_downloads
            else "NANOCHAT_DATA_DIR must point at a data kit with at least 2 shards in pretrain/"
        )
        raise FileNotFoundError(
            f"need at least 2 pretraining shards in {folder}, found {len(shards)}: {hint}"
        )
    return shards[:-1] if split == "train" else shards[-1:]


def iter_texts(shards: list[Path], doc_cap: int | None = None) -> Iterator[str]:
    """Every document of the shards in order, one row group in memory at a time, cropped to doc_cap."""
    for path in shards:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            for text in parquet.read_row_group(group, columns=["text"]).column("text").to_pylist():
                yield text if doc_cap is None else text[:doc_cap]


def estimate_chars(shards: list[Path]) -> int:
    """Characters in the shards, from parquet footers (uncompressed bytes ≈ chars for mostly-ASCII text)."""
    total = 0
    for path in shards:
        metadata = pq.ParquetFile(path).metadata
        total += sum(
            metadata.row_group(i).column(0).total_uncompressed_size for i in range(metadata.num_row_groups)
        )
    return total


# -----------------------------------------------------------------------------
# Downloads


def shards_to_download(num_train: int, last_shard: int) -> list[int]:
    """The first num_train shards plus the pinned validation shard (the source's last)."""
    assert num_train >= 1, "download at least one training shard"
    return sorted(set(range(min(num_train, last_shard))) | {last_shard})


def fetch_shard(
    source: str, filename: str, dest_dir: Path, backoff_s: float = 2.0, cancel: threading.Event | None = None
) -> Path:
    """One shard; it must parse as parquet (a truncated download has no valid footer) before it counts."""
    return fetch(
        join(source, filename), dest_dir / filename, check=pq.ParquetFile, backoff_s=backoff_s, cancel=cancel
    )


def download_shards(
    settings: TrainerSettings, num_train: int, workers: int = 4, backoff_s: float = 2.0
) -> None:
    """Fetch the missing shards in parallel; shards already present are kept, so this resumes."""
    if not settings.shard_downloads:
        raise RuntimeError(
            f"the shards come from {settings.pretrain_dir} (NANOCHAT_DATA_DIR or a corpus): a local corpus "
            "is read as is, not downloaded to"
        )
    dest_dir = pretrain_dir(settings)
    dest_dir.mkdir(parents=True, exist_ok=True)
    names = [shard_filename(i) for i in shards_to_download(num_train, settings.pretrain_last_shard)]
    missing = [name for name in names if not (dest_dir / name).exists()]
    print(f"pretraining shards: {len(names) - len(missing)}/{len(names)} present in {dest_dir}", flush=True)
    with (
        ThreadPoolExecutor(max_workers=workers) as pool,
        progress_bar(total=len(missing), unit="shard") as bar,
    ):
        futures = [
            pool.submit(fetch_shard, settings.pretrain_url, n, dest_dir, backoff_s=backoff_s) for n in missing
        ]
        for future in as_completed(futures):
            future.result()
            bar.update(1)


def ensure_shards_for(settings: TrainerSettings, num_chars: int) -> None:
    """Make sure enough training text for num_chars is on disk (downloading only into the base dir)."""
    if settings.shard_downloads:
        download_shards(settings, num_train=max(1, -(-num_chars // CHARS_PER_SHARD)))
    list_shards(settings, "train")  # raises a clear error when a local kit is incomplete


# -----------------------------------------------------------------------------
# Enough text for a run's planned tokens

# Best-fit packing crops the tails of documents that fit no row (base_train reports the share as
# crop_fraction): plan this many document tokens per token trained.
CROP_ALLOWANCE = 1.25
DOWNLOAD_BACKOFF_S = 2.0  # the first pause between tries of a shard download (it doubles each time)


def bytes_per_token(path: Path, tokenizer: Tokenizer, sample_bytes: int = 2_000_000) -> float:
    """Text bytes per token of a shard's first documents: with the text bytes of the parquet footers
    (`estimate_chars`), what estimates a shard's tokens without tokenizing it."""
    sample, sample_size = [], 0
    for text in iter_texts([path]):
        sample.append(text)
        sample_size += len(text.encode())
        if sample_size >= sample_bytes:
            break
    return sample_size / max(1, sum(map(len, tokenizer.encode_batch(sample))))


@dataclass
class ShardPlan:
    """The training shards a run reads, in order, and the ones still to download (in that order)."""

    shards: list[Path]
    missing: list[str]


def plan_training_shards(settings: TrainerSettings, tokenizer: Tokenizer, planned_tokens: int) -> ShardPlan:
    """The shards `planned_tokens` need. The first one, the val shard and the first missing one are
    fetched now (a source that cannot be reached shows before training); the rest are named for the
    background. Prints the plan, and how many passes over the data it makes when it repeats data."""
    if not settings.shard_downloads:
        shards = list_shards(settings, "train")
        report_passes(f"the local corpus {pretrain_dir(settings)}", shards, tokenizer, planned_tokens)
        return ShardPlan(shards, [])
    folder = pretrain_dir(settings)
    try:
        for index in (0, settings.pretrain_last_shard):
            fetch_shard(settings.pretrain_url, shard_filename(index), folder, DOWNLOAD_BACKOFF_S)
        first = folder / shard_filename(0)
        per_shard = estimate_chars([first]) / bytes_per_token(first, tokenizer)
        wanted = math.ceil(planned_tokens * CROP_ALLOWANCE / per_shard)
        names = [shard_filename(i) for i in range(min(wanted, settings.pretrain_last_shard))]
        missing = [name for name in names if not (folder / name).exists()]
        if missing:
            fetch_shard(settings.pretrain_url, missing.pop(0), folder, DOWNLOAD_BACKOFF_S)
    except RuntimeError as error:  # offline: what is on disk is all there is
        where = f"the shards in {folder} (cannot download: {error})"
        shards = list_shards(settings, "train")
        report_passes(where, shards, tokenizer, planned_tokens)
        return ShardPlan(shards, [])
    print0(
        f"data: {len(names)} training shards for {planned_tokens:,} planned tokens (~{per_shard:,.0f} tokens "
        f"each, ×{CROP_ALLOWANCE} for packing crops): {len(names) - len(missing)} present"
        + (f", {len(missing)} downloading in the background from {settings.pretrain_url}" if missing else "")
    )
    if wanted > len(names):  # the source has fewer shards than the plan needs
        report_passes(
            f"the source {settings.pretrain_url}", [folder / n for n in names], tokenizer, planned_tokens
        )
    return ShardPlan([folder / name for name in names], missing)


def report_passes(where: str, shards: list[Path], tokenizer: Tokenizer, planned_tokens: int) -> None:
    """One line: the tokens there are against the tokens planned, and how many passes that makes."""
    available = estimate_chars(shards) / bytes_per_token(shards[0], tokenizer) / CROP_ALLOWANCE
    passes = planned_tokens / max(1.0, available)
    verdict = f"about {passes:.1f} passes over it: the run repeats data" if passes > 1 else "enough"
    print0(
        f"data: {where} holds ~{available:,.0f} trainable tokens in {len(shards)} training shards for "
        f"{planned_tokens:,} planned tokens: {verdict}"
    )


class ShardDownload:
    """Shards fetched in a few background threads, in the order training reads them. The loader waits
    for each one as it gets there (`wait_for`); a shard that could not be fetched fails the run there."""

    def __init__(
        self,
        settings: TrainerSettings,
        names: list[str],
        workers: int = 4,
        backoff_s: float = DOWNLOAD_BACKOFF_S,
    ):
        self.source, self.folder, self.backoff_s = settings.pretrain_url, pretrain_dir(settings), backoff_s
        self.pending: queue.Queue[str] = queue.Queue()
        for name in names:
            self.pending.put(name)
        self.errors: dict[str, str] = {}
        self.cancel = threading.Event()
        self.threads = [
            threading.Thread(target=self.work, daemon=True) for _ in range(min(workers, len(names)))
        ]
        for thread in self.threads:
            thread.start()
        atexit.register(self.stop)  # an unfinished download deletes its temp file

    def work(self) -> None:
        while not self.cancel.is_set():
            try:
                name = self.pending.get_nowait()
            except queue.Empty:
                return
            try:
                fetch_shard(self.source, name, self.folder, self.backoff_s, self.cancel)
            except RuntimeError as error:
                self.errors[name] = str(error)
            except Cancelled:
                return

    def stop(self) -> None:
        self.cancel.set()
        for thread in self.threads:
            thread.join(timeout=10)


def wait_for_shard(path: Path, download: ShardDownload | None, poll_s: float = 0.5) -> None:
    """Block until `path` exists (another process or thread is downloading it); raise if it failed."""
    waited_since, said = time.monotonic(), 0.0
    while not path.exists():
        if download is not None and path.name in download.errors:
            raise RuntimeError(
                f"data: {download.errors[path.name]}; retry the job (it resumes from its last checkpoint) or "
                "train on local data (NANOCHAT_DATA_DIR)"
            )
        waited = time.monotonic() - waited_since
        if waited - said >= 60:
            print0(f"data: waiting {waited:.0f}s for {path.name} to download")
            said = waited
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Download pretraining shards (resumable).")
    parser.add_argument("-n", "--num-train-shards", type=int, default=8, help="training shards (default: 8)")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads (default: 4)")
    args = parser.parse_args(argv)
    download_shards(TrainerSettings(), args.num_train_shards, args.workers)


if __name__ == "__main__":
    main()
