"""Uploaded files checked line by line and prepared for training (trainer.validate_file), and read back by
the programs that name them: a mixture's `file` entries, --corpus, --questions."""

import json
from pathlib import Path

import pytest

from trainer import dataset, user_files, validate_file
from trainer.chat_rl import questions
from trainer.mixture import load_mixture
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer

SHAREGPT = {"conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"}]}


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_tokenizer: Tokenizer) -> TrainerSettings:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    tiny_tokenizer.save(tmp_path / "runs" / "tok" / "tokenizer")
    return TrainerSettings()


def upload(settings: TrainerSettings, purpose: str, *parts: tuple[str, str | bytes]) -> str:
    """A file as POST /files leaves it: its parts under our names, and file.json."""
    file_id = f"file-{len(list((settings.base_dir / 'files').glob('*'))):024x}"
    folder = user_files.file_dir(settings, file_id)
    folder.mkdir(parents=True)
    stored = []
    for index, (name, content) in enumerate(parts):
        path = folder / f"part-{index:03d}{Path(name).suffix}"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        stored.append({"name": name, "stored": path.name, "bytes": path.stat().st_size})
    (folder / "file.json").write_text(json.dumps({"id": file_id, "purpose": purpose, "parts": stored}))
    return file_id


def validate(file_id: str, *flags: str) -> dict:
    return validate_file.main(["--file", file_id, "--run", "tok", *flags])


def lines(*rows: object) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def test_a_sharegpt_file_with_two_broken_lines_names_both_and_prepares_nothing(settings) -> None:
    text = lines(
        SHAREGPT, '{"conversations": [', SHAREGPT, {"conversations": [{"from": "bot", "value": "?"}]}
    )
    file_id = upload(settings, "conversations", ("chats.jsonl", text))
    report = validate(file_id)
    assert report["status"] == "invalid" and report["problems_total"] == 2
    assert [(p["part"], p["line"]) for p in report["problems"]] == [("chats.jsonl", 2), ("chats.jsonl", 4)]
    assert report["problems"][0]["reason"].startswith("bad JSON")
    assert "unknown role 'bot'" in report["problems"][1]["reason"]
    assert not (user_files.file_dir(settings, file_id) / "data").exists()
    with pytest.raises(user_files.UnusableFile, match="invalid, not ready"):
        user_files.split_path(settings, file_id, "conversations", "train")


def test_a_fixed_file_is_ready_with_statistics_and_trains_through_a_mixture(settings, tmp_path) -> None:
    openai = {"messages": [{"role": "system", "content": "Be brief."}, *SHAREGPT_AS_OURS]}
    file_id = upload(
        settings, "conversations", ("chats.jsonl", lines(*[SHAREGPT] * 18, openai, SHAREGPT_AS_OURS))
    )
    report = validate(file_id, "--val-fraction", "0.1")
    stats = report["stats"]
    assert report["status"] == "ready" and report["problems"] == []
    assert stats["rows"] == 20 and (stats["train_rows"], stats["val_rows"]) == (18, 2)
    assert stats["formats"] == {"sharegpt": 18, "messages": 1, "list": 1}
    assert stats["roles"] == {"user": 20, "assistant": 20, "system": 1} and stats["tokenizer"] == "tok"
    assert stats["tokens"] > stats["assistant_tokens"] > 0 and sum(stats["histogram"]["counts"]) == 20
    assert report["samples"][0] == {"messages": SHAREGPT_AS_OURS}
    mixture = tmp_path / "mine.yaml"
    entry = f"{{source: file, id: {file_id}"
    mixture.write_text(f"train:\n  - {entry}, epochs: 2}}\nval:\n  - {entry}, split: val}}\n")
    assert (
        len(load_mixture(settings, mixture, "train")) == 36
        and len(load_mixture(settings, mixture, "val")) == 2
    )


SHAREGPT_AS_OURS = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("not json", "bad JSON"),
        ({"text": "hi"}, 'expected {"messages": [...]}'),
        ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
        ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
            "empty text",
        ),
        ({"messages": [SHAREGPT_AS_OURS[1], SHAREGPT_AS_OURS[0]]}, "roles must alternate"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "w " * 400}]},
            "over-long",
        ),
    ],
)
def test_each_problem_is_named_with_its_line_and_reason(settings, row: object, reason: str) -> None:
    file_id = upload(settings, "conversations", ("c.jsonl", lines(SHAREGPT, row)))
    report = validate(file_id, "--max-tokens", "64")
    assert report["status"] == "invalid"
    assert [p["line"] for p in report["problems"]] == [2] and reason in report["problems"][0]["reason"]


def test_problems_are_bounded_but_all_counted(settings) -> None:
    file_id = upload(settings, "conversations", ("c.jsonl", lines(*["{"] * 150)))
    report = validate(file_id)
    assert report["problems_total"] == 150 and len(report["problems"]) == validate_file.MAX_PROBLEMS


def test_text_files_become_a_corpus_of_paragraph_documents_with_a_val_shard(settings) -> None:
    paragraphs = [f"Paragraph {i} " + "word " * 300 for i in range(30)]
    book = "\n\n".join(paragraphs)  # ~45,000 characters: several documents
    file_id = upload(settings, "pretrain", ("book.txt", book), ("notes.md", "# Notes\n\nShort one."))
    report = validate(file_id, "--val-fraction", "0.2")
    assert report["status"] == "ready", report["problems"]
    documents = report["stats"]["documents"]
    assert documents == len(validate_file.paragraphs_as_documents(book)) + 1 and documents > 3
    corpus = user_files.with_corpus(TrainerSettings(), file_id)
    train, val = dataset.list_shards(corpus, "train"), dataset.list_shards(corpus, "val")
    assert len(list(dataset.iter_texts(train))) + len(list(dataset.iter_texts(val))) == documents
    assert all(len(text) <= validate_file.DOC_CHARS for text in dataset.iter_texts(train + val))
    assert not corpus.shard_downloads  # an uploaded corpus is read as is


def test_a_corpus_part_without_text_is_invalid(settings) -> None:
    file_id = upload(settings, "pretrain", ("a.jsonl", lines({"text": "fine"}, {"body": "x"}, {"text": ""})))
    report = validate(file_id)
    assert [(p["line"], p["reason"]) for p in report["problems"]] == [
        (2, 'expected {"text": "..."}'),
        (3, "empty text"),
    ]
    with pytest.raises(SystemExit, match=r"--corpus: file .* is invalid"):
        user_files.with_corpus(TrainerSettings(), file_id)


def test_questions_train_rl_and_a_missing_final_answer_is_a_problem(settings) -> None:
    good = [
        {"question": f"What is {i}+1?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
        for i in range(10)
    ]
    bad = upload(settings, "questions", ("q.jsonl", lines(*good, {"question": "Why?", "answer": "Because."})))
    assert validate(bad)["problems"][0]["line"] == 11
    file_id = upload(settings, "questions", ("q.jsonl", lines(*good)))
    assert validate(file_id, "--val-fraction", "0.2")["status"] == "ready"
    train, test = questions(TrainerSettings(), file_id)
    assert (len(train), len(test)) == (8, 2) and train.evaluate(train[0], f"#### {train[0]['answer']}")


def test_a_mixture_names_only_ready_conversations_and_each_bad_entry_by_its_line(settings) -> None:
    chats = upload(settings, "conversations", ("c.jsonl", lines(SHAREGPT, SHAREGPT)))
    pending = upload(settings, "conversations", ("p.jsonl", lines(SHAREGPT)))  # never validated
    yaml_text = (
        f"train:\n  - {{source: file, id: {chats}}}\n  - {{source: file, id: {pending}}}\n"
        "  - {source: jsonl, path: /etc/passwd}\n  - {source: nowhere}\n"
        "val:\n  - {source: smoltalk, split: test}\n"
    )
    mixture = upload(settings, "mixture", ("mix.yaml", yaml_text))
    validate(chats)
    report = validate(mixture)
    assert [p["line"] for p in report["problems"]] == [3, 4, 5]
    assert "validating, not ready" in report["problems"][0]["reason"]
    entry = f"{{source: file, id: {chats}}}"
    good = upload(settings, "mixture", ("mix.yaml", f"train:\n  - {entry}\nval:\n  - {entry}\n"))
    report = validate(good)
    assert report["status"] == "ready" and report["stats"]["files"] == [chats]
    assert user_files.mixture_path(TrainerSettings(), good).read_text().startswith("train:")
