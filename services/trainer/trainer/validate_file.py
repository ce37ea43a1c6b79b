"""
Validate an uploaded file and prepare it for training (POST /files runs this as the file's job):

    python -m trainer.validate_file --file file-0123… --run demo --val-fraction 0.05 --max-tokens 2048

Every row is checked and each problem named with its line (a parquet file's row) and reason: bad JSON,
an unknown role, no assistant turn, empty text, an over-long row; the first MAX_PROBLEMS are kept and all
are counted. The statistics count rows, tokens (with run RUN's tokenizer, when it has one), the lengths
and the roles. A file without a problem becomes `ready`: its data/ folder (user_files.py) is written
whole, its rows split into train and val (--val-fraction of them, drawn with a fixed seed; at least one
when there are two rows or more). A file with a problem becomes `invalid` and has no data/: nothing of
it is ever trained on, and it stays for inspection.

- conversations: JSONL, one conversation a line: ours and OpenAI's chat format ({"messages": [{"role",
  "content"}, …]}), the bare list of messages, or ShareGPT ({"conversations": [{"from": "human"|"gpt"|
  "system", "value"}, …]}), all stored as ours.
- pretrain: parquet with a `text` column, JSONL with {"text": …}, or plain .txt/.md cut into documents
  at paragraph breaks, up to DOC_CHARS characters each; several parts (a folder's files) make one
  corpus, written as parquet shards whose last one is the validation split.
- questions: GSM8K's JSONL ({"question", "answer"}, the answer ending in "#### <number>"): chat_rl's.
- mixture: a mixture YAML (mixture.py) whose entries name uploaded conversations by id
  ({source: file, id: file-…, split: train, epochs: 2}) and has a val list.
"""

import argparse
import json
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from trainer import mixture, user_files
from trainer.chat_format import ConversationError, is_part_list, normalize, render_conversation
from trainer.common import (
    Bounded,
    add_run_flag,
    atomic_write_json,
    make_temp_dir,
    print_banner,
    replace_dir,
)
from trainer.settings import TrainerSettings
from trainer.tasks import extract_answer
from trainer.tokenizer import Tokenizer

MAX_PROBLEMS = 100  # kept in the report; the rest are counted
MAX_LINE_BYTES = 4_000_000  # a longer line is an over-long row (and no conversation is that long)
DOC_CHARS = 8_000  # a plain-text document: paragraphs up to about a row of 2,048 tokens
SHARD_CHARS = 250_000_000  # characters per corpus shard, as many as a climbmix shard holds
ROW_GROUP = 64  # documents per parquet row group: several groups even in a small shard, for DDP striding
SAMPLES = 3  # rows shown in the report, as the browser renders them
HISTOGRAM_EDGES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
ROLES = ("user", "assistant", "system")
# How a message names its role and text, and the roles it may have (as ours): ours and OpenAI's, ShareGPT's.
OURS = ("role", "content", {role: role for role in ROLES})
SHAREGPT = (
    "from",
    "value",
    {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"},
)

parser = argparse.ArgumentParser(description="Validate an uploaded file and prepare it for training.")
add_run_flag(parser)
parser.add_argument("--file", type=user_files.file_id, required=True, help="the uploaded file's id (file-…)")
parser.add_argument(
    "--val-fraction",
    type=Bounded(float, 0, 0.5),
    default=0.05,
    help="share of the rows (documents) set aside as the validation split (default: 0.05)",
)
parser.add_argument(
    "--max-tokens",
    type=Bounded(int, 16, 65536),
    default=2048,
    help="a conversation longer than this many tokens is a problem: training would cut it (default: 2048, "
    "the recipe's context; counted with RUN's tokenizer, when it has one)",
)


@dataclass
class Report:
    """What a check finds: the problems, the statistics, and the rows to prepare."""

    problems: list[dict[str, Any]] = field(default_factory=list)
    problems_total: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    rows: list[Any] = field(default_factory=list)
    samples: list[Any] = field(default_factory=list)

    def problem(self, part: str, line: int | None, reason: str) -> None:
        self.problems_total += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append({"part": part, "line": line, "reason": reason})


def histogram(lengths: list[int], unit: str) -> dict[str, Any]:
    """Row lengths in buckets up to each edge (the last bucket is everything longer)."""
    counts = [0] * (len(HISTOGRAM_EDGES) + 1)
    for length in lengths:
        counts[next((i for i, edge in enumerate(HISTOGRAM_EDGES) if length <= edge), -1)] += 1
    return {"unit": unit, "edges": list(HISTOGRAM_EDGES), "counts": counts}


def json_lines(path: Path, part: str, report: Report) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line that parses; the others are problems."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if len(raw) > MAX_LINE_BYTES:
                report.problem(
                    part, number, f"over-long row: {len(raw):,} bytes (at most {MAX_LINE_BYTES:,})"
                )
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                report.problem(part, number, f"not UTF-8 text: {error.reason} at byte {error.start}")
                continue
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as error:
                report.problem(part, number, f"bad JSON: {error.msg} (column {error.colno})")


# -- conversations ---------------------------------------------------------------------------------


def text_of(content: Any, role: str) -> str | list[dict[str, str]] | None:
    """A message's content as ours: text, or the assistant's parts; OpenAI's list of text parts is joined.
    None when it is neither."""
    if isinstance(content, str):
        return content
    if role == "assistant" and is_part_list(content):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def conversation(row: Any) -> tuple[str, list[dict[str, Any]]]:
    """(format, messages as ours) of a line; ConversationError names what is wrong with it."""
    if isinstance(row, list):
        form, raw, (role_key, text_key, roles) = "list", row, OURS
    elif isinstance(row, dict) and isinstance(row.get("messages"), list):
        form, raw, (role_key, text_key, roles) = "messages", row["messages"], OURS
    elif isinstance(row, dict) and isinstance(row.get("conversations"), list):
        form, raw, (role_key, text_key, roles) = "sharegpt", row["conversations"], SHAREGPT
    else:
        raise ConversationError(
            'expected {"messages": [...]} (ours, OpenAI), {"conversations": [...]} (ShareGPT) or a list of '
            "messages"
        )
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise ConversationError(f"message {i}: expected an object, got {message!r:.60}")
        role = message.get(role_key)
        if role not in roles:
            raise ConversationError(f"message {i}: unknown role {role!r} (known: {', '.join(roles)})")
        content = text_of(message.get(text_key), roles[role])
        if content is None:
            raise ConversationError(f"message {i}: {text_key} must be text")
        texts = [content] if isinstance(content, str) else [p["text"] for p in content]
        if not "".join(texts).strip():
            raise ConversationError(f"message {i}: empty text")
        messages.append({"role": roles[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("no assistant turn: nothing to learn from")
    normalize(messages)  # roles alternate, user first (after an optional system message)
    return form, messages


def check_conversations(
    parts: list[tuple[str, Path]], tokenizer: Tokenizer | None, max_tokens: int
) -> Report:
    report = Report()
    forms, roles, lengths, trained = Counter(), Counter(), [], 0
    for part, path in parts:
        for number, row in json_lines(path, part, report):
            try:
                form, messages = conversation(row)
            except ConversationError as error:
                report.problem(part, number, str(error))
                continue
            if tokenizer is not None:
                ids, mask = render_conversation(tokenizer, messages, max_tokens=10**9)
                if len(ids) > max_tokens:
                    report.problem(
                        part,
                        number,
                        f"over-long row: {len(ids):,} tokens, more than --max-tokens {max_tokens:,} "
                        "(training would cut it)",
                    )
                    continue
                lengths.append(len(ids))
                trained += sum(mask)
            else:
                lengths.append(sum(len(json.dumps(m["content"], ensure_ascii=False)) for m in messages))
            forms[form] += 1
            roles.update(m["role"] for m in messages)
            report.rows.append({"messages": messages})
    report.samples = report.rows[:SAMPLES]
    report.stats = {
        "rows": len(report.rows),
        "formats": dict(forms),
        "messages": sum(roles.values()),
        "roles": {role: roles[role] for role in ROLES},
        "histogram": histogram(lengths, "tokens" if tokenizer else "characters"),
    }
    if tokenizer is not None:
        report.stats |= {"tokens": sum(lengths), "assistant_tokens": trained}
    return report


# -- questions (chat_rl) ---------------------------------------------------------------------------------


def check_questions(parts: list[tuple[str, Path]], tokenizer: Tokenizer | None) -> Report:
    report = Report()
    lengths = []
    for part, path in parts:
        for number, row in json_lines(path, part, report):
            if not isinstance(row, dict) or not all(
                isinstance(row.get(k), str) for k in ("question", "answer")
            ):
                report.problem(part, number, 'expected {"question": "...", "answer": "... #### 42"}')
            elif not row["question"].strip() or not row["answer"].strip():
                report.problem(part, number, "empty text")
            elif extract_answer(row["answer"]) is None:
                report.problem(part, number, "the answer has no final '#### <number>' (GSM8K's answer line)")
            else:
                text = row["question"] + row["answer"]
                lengths.append(len(tokenizer.encode(text)) if tokenizer else len(text))
                report.rows.append({"question": row["question"], "answer": row["answer"]})
    report.samples = [
        {
            "messages": [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ]
        }
        for r in report.rows[:SAMPLES]
    ]
    report.stats = {
        "rows": len(report.rows),
        "histogram": histogram(lengths, "tokens" if tokenizer else "characters"),
    }
    if tokenizer is not None:
        report.stats["tokens"] = sum(lengths)
    return report


# -- pretraining corpora ----------------------------------------------------------------------------------


def paragraphs_as_documents(text: str) -> list[str]:
    """Plain text cut at blank lines, the paragraphs joined back into documents of up to DOC_CHARS (a
    longer paragraph is a document of its own): one long file would otherwise be one document, cropped
    to a single row by the packing loader."""
    documents, current = [], ""
    for paragraph in (p.strip() for p in text.replace("\r\n", "\n").split("\n\n")):
        if not paragraph:
            continue
        if current and len(current) + 2 + len(paragraph) > DOC_CHARS:
            documents.append(current)
            current = ""
        current = f"{current}\n\n{paragraph}" if current else paragraph
    return [*documents, current] if current else documents


def part_documents(part: str, path: Path, report: Report) -> Iterator[tuple[int | None, Any]]:
    """(line or row, text) of a corpus part, by its kind; a part that cannot be read is a problem."""
    if path.suffix == ".parquet":
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as error:
            report.problem(part, None, f"not a parquet file: {error}")
            return
        if "text" not in parquet.schema_arrow.names:
            report.problem(part, None, f"no `text` column (columns: {', '.join(parquet.schema_arrow.names)})")
            return
        number = 0
        for group in range(parquet.num_row_groups):
            for text in parquet.read_row_group(group, columns=["text"]).column("text").to_pylist():
                number += 1
                yield number, text
    elif path.suffix == ".jsonl":
        for number, row in json_lines(path, part, report):
            yield number, row.get("text") if isinstance(row, dict) else row
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as error:
            report.problem(part, None, f"not UTF-8 text: {error.reason} at byte {error.start}")
            return
        documents = paragraphs_as_documents(text)
        yield from ((None, document) for document in documents) if documents else [(None, "")]


def check_corpus(parts: list[tuple[str, Path]], tokenizer: Tokenizer | None) -> Report:
    report = Report()
    for part, path in parts:
        for number, text in part_documents(part, path, report):
            if not isinstance(text, str):
                expected = 'expected {"text": "..."}' if path.suffix == ".jsonl" else "text must be a string"
                report.problem(part, number, expected)
            elif not text.strip():
                report.problem(part, number, "empty text")
            else:
                report.rows.append(text)
    if len(report.rows) < 2 and not report.problems_total:
        report.problem(parts[0][0], None, "a corpus needs two documents or more: one at least for validation")
    lengths = list(map(len, tokenizer.encode_batch(report.rows) if tokenizer else report.rows))
    report.samples = [text[:500] for text in report.rows[:SAMPLES]]
    report.stats = {
        "documents": len(report.rows),
        "characters": sum(map(len, report.rows)),
        "histogram": histogram(lengths, "tokens" if tokenizer else "characters"),
    }
    if tokenizer is not None:
        report.stats["tokens"] = sum(lengths)
    return report


def write_shards(folder: Path, train: list[str], val: list[str]) -> int:
    """shard_00000… of the training documents, then the validation shard, last by name as the loaders
    expect. Returns how many training shards."""
    folder.mkdir(parents=True)
    shards, current = [], []
    for document in train:
        if current and sum(map(len, current)) + len(document) > SHARD_CHARS:
            shards.append(current)
            current = []
        current.append(document)
    for index, documents in enumerate([*shards, current, val]):
        table = pa.table({"text": documents})
        pq.write_table(
            table, folder / f"shard_{index:05d}.parquet", row_group_size=ROW_GROUP, compression="zstd"
        )
    return len(shards) + 1


# -- mixtures ----------------------------------------------------------------------------------------------


def check_mixture(settings: TrainerSettings, parts: list[tuple[str, Path]]) -> Report:
    """The mixture's structure, entry by entry with its line; the files it names must be ready
    conversations (their data is loaded only when a job trains on the mixture)."""
    report = Report()
    part, path = parts[0]
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        root = yaml.compose(text)
        spec = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        report.problem(part, mark.line + 1 if mark else None, f"bad YAML: {getattr(error, 'problem', error)}")
        return report
    if not isinstance(spec, dict) or not isinstance(spec.get("train"), list):
        report.problem(part, 1, "expected a mapping with a `train` list of entries (and a `val` list)")
        return report
    if not isinstance(spec.get("val"), list) or not spec["val"]:
        report.problem(
            part,
            1,
            "no `val` list: the chat stages measure val bpb on it (e.g. {source: file, id: …, split: val})",
        )
    nodes = {key.value: value for key, value in root.value}
    uses = set()
    for split in ("train", "val"):
        for node, entry in zip(getattr(nodes.get(split), "value", []), spec.get(split) or [], strict=False):
            line = node.start_mark.line + 1
            reason = entry_problem(settings, entry)
            if reason:
                report.problem(part, line, f"{split} entry: {reason}")
            elif entry["source"] == "file":
                uses.add(entry["id"])
            report.rows.append(entry)
    report.stats = {
        "train_entries": len(spec.get("train") or []),
        "val_entries": len(spec.get("val") or []),
        "files": sorted(uses),
    }
    return report


def entry_problem(settings: TrainerSettings, entry: Any) -> str | None:
    if not isinstance(entry, dict) or "source" not in entry:
        return f"an entry is a mapping with a `source`, got {entry!r:.80}"
    if unknown := set(entry) - mixture.ENTRY_KEYS:
        return f"unknown keys {sorted(unknown)}; an entry may have {sorted(mixture.ENTRY_KEYS)}"
    if entry["source"] not in mixture.SOURCES:
        return f"unknown source {entry['source']!r}; known: {', '.join(mixture.SOURCES)}"
    if "path" in entry:
        return "an uploaded mixture names uploaded files by id ({source: file, id: file-…}), not by path"
    if entry["source"] == "jsonl":
        return "upload the conversations and name them by id: {source: file, id: file-…}"
    if entry["source"] == "file":
        try:
            split = entry.get("split", "train")
            user_files.split_path(settings, str(entry.get("id")), "conversations", split)
        except user_files.UnusableFile as error:
            return str(error)
    return None


# -- the program ---------------------------------------------------------------------------------------------


def split_rows(rows: list[Any], val_fraction: float) -> tuple[list[Any], list[Any]]:
    """(train, val): val_fraction of the rows, drawn with a fixed seed, at least one of two or more."""
    count = 0 if val_fraction == 0 or len(rows) < 2 else max(1, round(len(rows) * val_fraction))
    val = set(random.Random(0).sample(range(len(rows)), count))
    return [r for i, r in enumerate(rows) if i not in val], [r for i, r in enumerate(rows) if i in val]


def prepare(purpose: str, report: Report, original: Path, folder: Path, val_fraction: float) -> None:
    """Write what training reads into `folder`, and the split's sizes into the statistics."""
    if purpose == "mixture":
        (folder / "mixture.yaml").write_bytes(original.read_bytes())
        return
    train, val = split_rows(report.rows, val_fraction)
    if purpose == "pretrain":
        report.stats["shards"] = write_shards(folder / "pretrain", train, val)
    else:
        for split, rows in (("train", train), ("val", val)):
            lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            (folder / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    report.stats |= {"train_rows": len(train), "val_rows": len(val)}


def check(settings: TrainerSettings, args: argparse.Namespace, upload: dict, folder: Path) -> Report:
    parts = [(part["name"], folder / part["stored"]) for part in upload["parts"]]
    tokenizer_dir = settings.run_dir(args.run) / "tokenizer"
    tokenizer = Tokenizer.load(tokenizer_dir) if (tokenizer_dir / "tokenizer.json").exists() else None
    purpose = upload["purpose"]
    if purpose == "conversations":
        report = check_conversations(parts, tokenizer, args.max_tokens)
    elif purpose == "questions":
        report = check_questions(parts, tokenizer)
    elif purpose == "pretrain":
        report = check_corpus(parts, tokenizer)
    else:
        report = check_mixture(settings, parts)
    if not report.rows and not report.problems_total:
        report.problem(parts[0][0], None, "no rows: the file is empty")
    report.stats["tokenizer"] = args.run if tokenizer else None
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parser.parse_args(argv)
    settings = TrainerSettings()
    print_banner("validate_file", args, settings)
    folder = user_files.file_dir(settings, args.file)
    upload = user_files.read_json(folder / "file.json")
    if upload is None:
        raise SystemExit(f"no uploaded file {args.file} in {folder.parent}")
    report = check(settings, args, upload, folder)
    status = "invalid" if report.problems_total else "ready"
    data = folder / "data"
    if status == "ready":
        new = make_temp_dir(data)
        prepare(upload["purpose"], report, folder / upload["parts"][0]["stored"], new, args.val_fraction)
        replace_dir(new, data)
    elif data.exists():
        shutil.rmtree(data)  # an earlier validation's data goes: nothing of an invalid file is used
    outcome = {
        "status": status,
        "stats": report.stats,
        "problems": report.problems,
        "problems_total": report.problems_total,
        "samples": report.samples,
    }
    atomic_write_json(folder / "report.json", outcome)
    for problem in report.problems:
        where = f"{problem['part']}" + (f":{problem['line']}" if problem["line"] else "")
        print(f"problem: {where}: {problem['reason']}", flush=True)
    print(f"{args.file}: {status} | " + json.dumps(report.stats, ensure_ascii=False), flush=True)
    return outcome


if __name__ == "__main__":
    main()
