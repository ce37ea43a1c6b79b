"""
Train the BPE tokenizer on the pretraining shards (or an uploaded corpus, --corpus) and save it to
runs/<run>/tokenizer/.

    python -m trainer.tok_train --run demo --vocab-size 32768 --max-chars 2000000000
"""

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

from trainer import dataset, user_files
from trainer.common import Bounded, add_run_flag, print_banner, progress_bar
from trainer.report import write_section
from trainer.settings import TrainerSettings
from trainer.tokenizer import MIN_VOCAB_SIZE, Tokenizer

parser = argparse.ArgumentParser(description="Train a BPE tokenizer (rustbpe) on the pretraining shards.")
add_run_flag(parser)
# Tokenizer
parser.add_argument(
    "--vocab-size",
    type=Bounded(int, MIN_VOCAB_SIZE, 2**17),
    default=32768,
    help="vocab size including the 256 byte tokens and the 9 specials (default: 2^15)",
)
# Data
parser.add_argument(
    "--max-chars",
    type=Bounded(int, 10_000, 100_000_000_000),
    default=2_000_000_000,
    help="train on at most this many characters (default: 2B, nanochat's budget)",
)
user_files.add_corpus_flag(parser)
parser.add_argument(
    "--doc-cap",
    type=Bounded(int, 100, 1_000_000),
    default=10_000,
    help="crop each document to this many characters so a few huge ones do not dominate (default: 10,000)",
)


def capped_texts(texts: Iterator[str], max_chars: int, seen: dict[str, int], expected: int) -> Iterator[str]:
    """Yield documents until max_chars, counting chars and documents into `seen`; `expected` sizes the bar."""
    with progress_bar(total=expected, unit="char", unit_scale=True, desc="tokenizer training text") as bar:
        for text in texts:
            text = text[: max_chars - seen["chars"]]
            if not text:
                break
            seen["chars"] += len(text)
            seen["docs"] += 1
            bar.update(len(text))
            yield text
        bar.total = bar.n  # the estimate ignores doc_cap: end the bar at 100%


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    """Compression on held-out text: UTF-8 bytes per token, higher is better."""
    num_tokens = sum(len(ids) for ids in tokenizer.encode_batch(texts))
    return sum(len(text.encode("utf-8")) for text in texts) / max(1, num_tokens)


def main(argv: list[str] | None = None) -> dict:
    args = parser.parse_args(argv)
    settings = user_files.with_corpus(TrainerSettings(), args.corpus)
    print_banner("tok_train", args, settings)
    dataset.ensure_shards_for(settings, args.max_chars)

    seen = {"chars": 0, "docs": 0}
    shards = dataset.list_shards(settings, "train")
    expected = min(args.max_chars, dataset.estimate_chars(shards))
    texts = capped_texts(dataset.iter_texts(shards, args.doc_cap), args.max_chars, seen, expected)
    start = time.time()
    tokenizer = Tokenizer.train(texts, args.vocab_size)
    train_seconds = time.time() - start
    folder: Path = settings.run_dir(args.run) / "tokenizer"
    tokenizer.save(folder)

    val_texts = list(dataset.iter_texts(dataset.list_shards(settings, "val")))
    summary = {
        "vocab_size": tokenizer.vocab_size,
        "special_tokens": len(tokenizer.special_tokens),
        "docs_seen": seen["docs"],
        "chars_seen": seen["chars"],
        "train_seconds": round(train_seconds, 2),
        "val_bytes_per_token": round(bytes_per_token(tokenizer, val_texts), 4),
        "tokenizer_dir": str(folder),
    }
    if tokenizer.vocab_size < args.vocab_size:
        print(f"note: the text only supported {tokenizer.vocab_size} of {args.vocab_size} tokens", flush=True)
    write_section(settings, args.run, "tok_train", summary, vars(args))
    print("tokenizer trained:", flush=True)
    for key, value in summary.items():
        print(
            f"  {key:<20} {value:,}" if isinstance(value, int | float) else f"  {key:<20} {value}", flush=True
        )
    return summary


if __name__ == "__main__":
    main()
