"""
Tokenizer and dataloader throughput on the pretraining text:
  - rustbpe training speed (MB of text per second) at the default vocab size;
  - encoding speed of our tokenizer (tiktoken with our ranks) with 1 and 2 threads;
  - rustbpe's own encoder on the same text and vocab (we encode with tiktoken; this is why);
  - tiktoken's GPT-4 encoding (cl100k_base) on the same text, when it is cached or downloadable;
  - the packing dataloader's tokens per second (read, tokenize, pack) at seq 2048.
Prints a table and one JSON line. Data: NANOCHAT_DATA_DIR (default ../shared/data).

    .venv/bin/python bench/tokenizer.py [--vocab-size 32768]
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import rustbpe
import tiktoken

from trainer import dataset
from trainer.dataloader import PackingLoader
from trainer.settings import TrainerSettings
from trainer.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def best_of(runs: int, fn) -> float:
    """Fastest wall time of several runs (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab-size", type=int, default=32768)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    data_dir = os.environ.get("NANOCHAT_DATA_DIR") or str(ROOT.parent / "shared" / "data")
    settings = TrainerSettings(data_dir=Path(data_dir))
    shards = dataset.list_shards(settings, "train")
    texts = list(dataset.iter_texts(shards, doc_cap=10_000))
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6

    train_s = best_of(args.runs, lambda: Tokenizer.train(texts, args.vocab_size))
    tokenizer = Tokenizer.train(texts, args.vocab_size)
    results = {"text_mb": round(megabytes, 2), "train_mb_s": round(megabytes / train_s, 2)}
    for threads in (1, 2):
        seconds = best_of(args.runs, lambda n=threads: tokenizer.encode_batch(texts, num_threads=n))
        results[f"encode_mb_s_{threads}t"] = round(megabytes / seconds, 2)
    rust = rustbpe.Tokenizer()
    rust.train_from_iterator(iter(texts), args.vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    results["rustbpe_encode_mb_s"] = round(
        megabytes / best_of(args.runs, lambda: rust.batch_encode(texts)), 2
    )
    try:
        gpt4 = tiktoken.get_encoding("cl100k_base")
        seconds = best_of(args.runs, lambda: gpt4.encode_ordinary_batch(texts, num_threads=1))
        results["tiktoken_gpt4_encode_mb_s_1t"] = round(megabytes / seconds, 2)
    except Exception as error:  # offline and not cached
        results["tiktoken_gpt4_encode_mb_s_1t"] = None
        print(f"note: tiktoken's cl100k_base unavailable ({type(error).__name__}); its column is empty")

    loader = PackingLoader(tokenizer, shards, batch_size=8, seq_len=2048)
    next(loader)  # fill the buffer first: steady state is what a training run sees
    batches = 40
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    results["dataloader_tok_s"] = round(batches * 8 * 2048 / (time.perf_counter() - start))

    machine = f"{platform.machine()} | {os.cpu_count()} CPUs"
    print(f"tokenizer benchmark | {machine} | vocab {args.vocab_size:,} | {megabytes:.1f} MB of text")
    print(f"{'measure':<34} {'value':>12}")
    for key, value in results.items():
        print(f"{key:<34} {value if value is not None else '-':>12}")
    print(json.dumps({"bench": "tokenizer", "vocab_size": args.vocab_size, **results}))


if __name__ == "__main__":
    main()
