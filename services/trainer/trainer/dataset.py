"""
The pretraining corpus: parquet shards with one `text` column, the last shard (sorted by name) being
the validation split. The same layout is read from a local data kit (NANOCHAT_DATA_DIR/pretrain/) or
from the copy this module downloads into $NANOCHAT_BASE_DIR/data/pretrain/.

    python -m trainer.dataset -n 8     # shards 0..7 for training, plus the source's pinned val shard
"""

import argparse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pyarrow.parquet as pq

from trainer.common import progress_bar
from trainer.download import fetch, join
from trainer.settings import TrainerSettings

# Each climbmix shard holds ~250M characters; used to size downloads from a character budget.
CHARS_PER_SHARD = 250_000_000


def shard_filename(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def pretrain_dir(settings: TrainerSettings) -> Path:
    return settings.data_root / "pretrain"


def list_shards(settings: TrainerSettings, split: str) -> list[Path]:
    """Train shards (all but the last) or the val shard (the last), in name order."""
    assert split in ("train", "val"), f"split must be 'train' or 'val', not {split!r}"
    folder = pretrain_dir(settings)
    shards = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if len(shards) < 2:
        hint = (
            "run `python -m trainer.dataset -n 8` to download them"
            if settings.downloads_allowed
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


def fetch_shard(source: str, filename: str, dest_dir: Path, backoff_s: float = 2.0) -> Path:
    """One shard; it must parse as parquet (a truncated download has no valid footer) before it counts."""
    return fetch(join(source, filename), dest_dir / filename, check=pq.ParquetFile, backoff_s=backoff_s)


def download_shards(
    settings: TrainerSettings, num_train: int, workers: int = 4, backoff_s: float = 2.0
) -> None:
    """Fetch the missing shards in parallel; shards already present are kept, so this resumes."""
    if not settings.downloads_allowed:
        raise RuntimeError(
            f"NANOCHAT_DATA_DIR is set ({settings.data_dir}): a local kit is read as is, not downloaded to"
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
    if settings.downloads_allowed:
        download_shards(settings, num_train=max(1, -(-num_chars // CHARS_PER_SHARD)))
    list_shards(settings, "train")  # raises a clear error when a local kit is incomplete


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Download pretraining shards (resumable).")
    parser.add_argument("-n", "--num-train-shards", type=int, default=8, help="training shards (default: 8)")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallel downloads (default: 4)")
    args = parser.parse_args(argv)
    download_shards(TrainerSettings(), args.num_train_shards, args.workers)


if __name__ == "__main__":
    main()
