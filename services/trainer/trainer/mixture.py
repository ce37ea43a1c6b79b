"""
Task mixtures for the chat stages, declared as data. A mixture file (YAML) lists the train and val
entries of a stage; the recipes' own are beside this file (sft.yaml: the current SFT; mid.yaml and
sft_classic.yaml: the classic mid and SFT):

    train:
      - {source: smoltalk, split: train}
      - {source: mmlu, split: auxiliary_train, epochs: 3, optional: true}
      - {source: gsm8k, split: train, epochs: 4}
      - {source: identity, epochs: 2}                   # the reference's 1,000 identity conversations
      - {source: simple-spelling, rows: 200000}
      - {source: spelling-bee, rows: 80000}
      - {source: jsonl, path: my_conversations.jsonl, epochs: 2}
      - {source: file, id: file-0123456789abcdef01234567, epochs: 2}   # uploaded through the API
    val:
      - {source: smoltalk, split: test}

Sources: smoltalk (chat conversations), mmlu, arc-easy, arc-challenge (multiple choice), gsm8k (with
calculator calls), simple-spelling and spelling-bee (synthetic spelling and letter counting, generated
as the reference does), identity (the reference's synthetic conversations about who the model is),
identity-template (ours: conversations generated from a template of facts, identity.yaml or `path`),
jsonl (CustomJSON: one conversation a line, either {"messages": [...]} or a bare list of
{"role", "content"} messages) and file (conversations uploaded through the API, by id, once validated:
its `split` is train or val, as chosen at upload; user_files.py). Datasets come in the order of their
seed-42 shuffle, as the reference's tasks do. `rows: N` keeps an entry's first N conversations (the
synthetic sources generate N: a count, as the reference's sizes are, so on a small data kit they
outweigh the real data), `epochs: E` repeats it (a fraction keeps a prefix), `optional: true` skips
an entry whose data is missing instead of failing. Relative paths are relative to the mixture file. All
entries are shuffled together (random.Random(seed), the reference's TaskMixture order at seed 42), so
sources interleave.
"""

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trainer import task_data, tasks, user_files
from trainer.chat_format import ConversationError, normalize
from trainer.settings import TrainerSettings

Conversation = dict[str, Any]
DEFAULTS_DIR = Path(__file__).parent
ENTRY_KEYS = {"source", "split", "rows", "epochs", "optional", "path", "id"}
SOURCES = (
    "smoltalk", "mmlu", "arc-easy", "arc-challenge", "gsm8k", "simple-spelling", "spelling-bee", "identity",
    "identity-template", "jsonl", "file",
)  # fmt: skip


@dataclass
class Mixture:
    conversations: list[Conversation]
    parts: list[tuple[str, int]]  # (entry label, conversations it contributed)

    def __len__(self) -> int:
        return len(self.conversations)

    def __getitem__(self, index: int) -> Conversation:
        return self.conversations[index]

    def describe(self) -> str:
        return ", ".join(f"{label} {count:,}" for label, count in self.parts) + f" = {len(self):,}"


def load_mixture(settings: TrainerSettings, path: Path, split: str, seed: int = 42) -> Mixture:
    """The `split` ("train" or "val") of the mixture file, shuffled."""
    spec = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if split not in spec:
        raise ValueError(f"{path}: no '{split}' list of entries")
    conversations: list[Conversation] = []
    parts = []
    for number, entry in enumerate(spec[split], 1):
        label = f"{path.name} {split}[{number}]"
        try:
            rows = entry_conversations(settings, entry, path.parent)
        except FileNotFoundError as error:
            if isinstance(entry, dict) and entry.get("optional"):
                print(f"mixture: skipping optional {label} ({entry['source']}): {error}", flush=True)
                continue
            raise FileNotFoundError(f"{label}: {error}") from error
        except (KeyError, ValueError) as error:
            raise ValueError(f"{label}: {error}") from error
        rows = repeat(rows, float(entry.get("epochs", 1)))
        conversations += rows
        parts.append((entry_label(entry), len(rows)))
    if not conversations:
        raise ValueError(f"{path}: the '{split}' entries hold no conversations")
    random.Random(seed).shuffle(conversations)
    return Mixture(conversations, parts)


def entry_label(entry: dict) -> str:
    detail = entry.get("split") or (Path(entry["path"]).name if entry.get("path") else "")
    epochs = f" ×{entry['epochs']}" if entry.get("epochs", 1) != 1 else ""
    return f"{entry['source']}{'/' + detail if detail else ''}{epochs}"


def repeat(rows: list[Conversation], epochs: float) -> list[Conversation]:
    if epochs < 0:
        raise ValueError(f"epochs must be ≥ 0, got {epochs}")
    whole = int(epochs)
    return rows * whole + rows[: round((epochs - whole) * len(rows))]


SYNTHETIC = ("simple-spelling", "spelling-bee", "identity-template")  # generated: `rows` is how many


def entry_conversations(settings: TrainerSettings, entry: Any, folder: Path) -> list[Conversation]:
    if not isinstance(entry, dict) or "source" not in entry:
        raise ValueError(f"an entry is a mapping with a 'source', got {entry!r}")
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; an entry may have {sorted(ENTRY_KEYS)}")
    source, split, rows = entry["source"], entry.get("split", "train"), entry.get("rows")
    if source in SYNTHETIC and rows is None:
        raise ValueError(f"a {source} entry needs rows: N (how many conversations to generate)")
    if source == "smoltalk":
        rows_of_split = tasks.shuffled(task_data.task_rows(settings, "smoltalk", split))
        conversations = [{"messages": row["messages"]} for row in rows_of_split]
    elif source == "mmlu":
        conversations = tasks.mmlu(settings, split).conversations
    elif source in ("arc-easy", "arc-challenge"):
        conversations = tasks.arc(settings, source.split("-")[1].capitalize(), split).conversations
    elif source == "gsm8k":
        conversations = tasks.gsm8k(settings, split).conversations
    elif source == "simple-spelling":
        return tasks.simple_spelling(settings, rows, split)
    elif source == "spelling-bee":
        return tasks.spelling_bee(settings, rows, split).conversations
    elif source == "identity":
        conversations = read_jsonl(task_data.identity_path(settings))
    elif source == "identity-template":
        return identity_conversations(resolve(entry.get("path", "identity.yaml"), folder), rows)
    elif source == "jsonl":
        if "path" not in entry:
            raise ValueError("a jsonl entry needs path: FILE")
        conversations = read_jsonl(resolve(entry["path"], folder))
    elif source == "file":
        uploaded = user_files.split_path(settings, str(entry.get("id")), "conversations", split)
        conversations = read_jsonl(uploaded)
    else:
        raise ValueError(f"unknown source {source!r}; known: {', '.join(SOURCES)}")
    return conversations if rows is None else conversations[:rows]


def resolve(path: str, folder: Path) -> Path:
    """A path from a mixture file: ~ expanded, relative to the file's folder, else the packaged default."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    local, packaged = folder / candidate, DEFAULTS_DIR / candidate
    return packaged if not local.exists() and packaged.exists() else local


def read_jsonl(path: Path) -> list[Conversation]:
    """CustomJSON conversations, each line checked; an error names the file and line."""
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    conversations = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages = row["messages"] if isinstance(row, dict) else row
            if not isinstance(messages, list):
                raise ConversationError('expected {"messages": [...]} or a list of messages')
            normalize(messages)
        except (json.JSONDecodeError, KeyError, ConversationError) as error:
            raise ValueError(f"{path}:{number}: {error}") from error
        conversations.append({"messages": messages})
    return conversations


def identity_conversations(path: Path, rows: int, seed: int = 0) -> list[Conversation]:
    """Our identity-template source: conversations about the model itself from a template file that you
    edit to say who your model is (see identity.yaml); each picks
    a topic, one of its questions and one of its answers, with the file's facts filled in; some start
    with a greeting turn."""
    if not path.exists():
        raise FileNotFoundError(f"identity template {path} does not exist")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    facts, topics, greetings = spec.get("facts", {}), spec["topics"], spec.get("greetings", [])
    rng = random.Random(seed)

    def fill(text: str) -> str:
        return text.format(**facts)

    conversations = []
    for _ in range(rows):
        messages = []
        if greetings and rng.random() < 0.3:
            greeting = rng.choice(greetings)
            messages += [
                {"role": "user", "content": fill(rng.choice(greeting["user"]))},
                {"role": "assistant", "content": fill(rng.choice(greeting["assistant"]))},
            ]
        topic = rng.choice(topics)
        messages += [
            {"role": "user", "content": fill(rng.choice(topic["user"]))},
            {"role": "assistant", "content": fill(rng.choice(topic["assistant"]))},
        ]
        conversations.append({"messages": messages})
    return conversations
