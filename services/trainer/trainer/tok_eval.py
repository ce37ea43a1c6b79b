"""
Evaluate the run's tokenizer: bytes per token (compression; higher is better) on the validation shard
and on each task's text, next to GPT-2's and GPT-4's tokenizers when tiktoken has them (they are
downloaded once and cached; offline and uncached, they are skipped with a note).

    python -m trainer.tok_eval --run demo
"""

import argparse
from collections.abc import Callable

import tiktoken

from trainer import dataset, task_data
from trainer.common import add_run_flag, print0, print_banner
from trainer.report import write_section
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer

parser = argparse.ArgumentParser(description="Bytes per token of the run's tokenizer vs GPT-2 and GPT-4.")
add_run_flag(parser)
parser.add_argument(
    "--max-chars", type=int, default=2_000_000, help="characters of text per set, at most (default: 2M)"
)

REFERENCE_ENCODINGS = {"gpt2": "gpt2", "gpt4": "cl100k_base"}


def chat_text(row: dict) -> str:
    return "\n".join(m["content"] for m in row["messages"])


# Each set: (task, split, row → text). The validation shard is added first.
TEXT_SETS: dict[str, tuple[str, str, Callable[[dict], str]]] = {
    "smoltalk-test": ("smoltalk", "test", chat_text),
    "gsm8k-test": ("gsm8k", "test", lambda r: f"{r['question']}\n{r['answer']}"),
    "mmlu-test": ("mmlu", "test", lambda r: "\n".join([r["question"], *r["choices"]])),
    "arc-easy-test": ("arc-easy", "test", lambda r: "\n".join([r["question"], *r["choices"]["text"]])),
    "humaneval-test": ("humaneval", "test", lambda r: r["prompt"] + r["canonical_solution"]),
}


def capped(texts, max_chars: int) -> list[str]:
    kept, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        kept.append(text[: max_chars - total])
        total += len(kept[-1])
    return kept


def load_text_sets(settings: TrainerSettings, max_chars: int) -> tuple[dict[str, list[str]], list[str]]:
    """Texts per set, and notes for sets that could not be loaded."""
    sets = {"pretrain-val": capped(dataset.iter_texts(dataset.list_shards(settings, "val")), max_chars)}
    notes = []
    for name, (task, split, to_text) in TEXT_SETS.items():
        try:
            rows = task_data.task_rows(settings, task, split)
        except (FileNotFoundError, RuntimeError, OSError) as error:
            notes.append(f"{name}: skipped ({error})")
            continue
        sets[name] = capped((to_text(row) for row in rows), max_chars)
    return sets, notes


def reference_encoders(notes: list[str]) -> dict[str, Callable[[str], list[int]]]:
    encoders = {}
    for label, name in REFERENCE_ENCODINGS.items():
        try:
            encoders[label] = tiktoken.get_encoding(name).encode_ordinary
        except Exception as error:  # offline and not cached: tiktoken raises requests/OS errors
            notes.append(
                f"{label}: skipped, tiktoken's '{name}' is neither cached nor downloadable ({error!r:.80})"
            )
    return encoders


def bytes_per_token(texts: list[str], encode: Callable[[str], list[int]]) -> float:
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return num_bytes / max(1, sum(len(encode(t)) for t in texts))


def main(argv: list[str] | None = None) -> dict:
    args = parser.parse_args(argv)
    settings = TrainerSettings()
    print_banner("tok_eval", args, settings)
    tokenizer = Tokenizer.load(settings.run_dir(args.run) / "tokenizer")
    sets, notes = load_text_sets(settings, args.max_chars)
    encoders = {"ours": tokenizer.encode, **reference_encoders(notes)}

    results = {
        name: {label: bytes_per_token(texts, enc) for label, enc in encoders.items()}
        for name, texts in sets.items()
    }
    header = f"{'text set':<16} {'chars':>10} " + " ".join(f"{label:>8}" for label in encoders)
    print0(f"bytes per token (higher is better), vocab {tokenizer.vocab_size:,}:")
    print0(header)
    print0("-" * len(header))
    for name, texts in sets.items():
        row = " ".join(f"{results[name][label]:>8.3f}" for label in encoders)
        print0(f"{name:<16} {sum(map(len, texts)):>10,} {row}")
    for note in notes:
        print0(f"note: {note}")
    summary = {
        f"{name}/{label}": round(v, 4) for name, by_label in results.items() for label, v in by_label.items()
    }
    write_section(settings, args.run, "tok_eval", summary, vars(args))
    return summary


if __name__ == "__main__":
    main()
