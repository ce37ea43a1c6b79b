"""Task datasets, the eval bundle and the word list: read from a kit, or downloaded once into the base dir."""

import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer import task_data
from trainer.settings import TrainerSettings
from trainer.task_data import TASK_FILES, TaskFile

# The columns each task's loader relies on (the Hugging Face schemas).
EXPECTED_COLUMNS = {
    "smoltalk": {"messages"},
    "gsm8k": {"question", "answer"},
    "mmlu": {"question", "subject", "choices", "answer"},
    "arc-easy": {"id", "question", "choices", "answerKey"},
    "arc-challenge": {"id", "question", "choices", "answerKey"},
    "humaneval": {"task_id", "prompt", "canonical_solution", "test", "entry_point"},
}
IN_KIT = [
    ("smoltalk", "train"),
    ("smoltalk", "test"),
    ("gsm8k", "train"),
    ("gsm8k", "test"),
    ("mmlu", "dev"),
    ("mmlu", "test"),
    ("arc-easy", "test"),
    ("arc-challenge", "test"),
    ("humaneval", "test"),
]


@pytest.mark.parametrize(("task", "split"), IN_KIT)
def test_kit_task_files_have_the_real_schemas(data_kit: Path, tmp_path: Path, task: str, split: str) -> None:
    rows = task_data.task_rows(TrainerSettings(base_dir=tmp_path, data_dir=data_kit), task, split)
    assert rows and EXPECTED_COLUMNS[task] <= set(rows[0])


def test_kit_eval_bundle_and_words(data_kit: Path, tmp_path: Path) -> None:
    settings = TrainerSettings(base_dir=tmp_path, data_dir=data_kit)
    assert (task_data.eval_bundle_dir(settings) / "core.yaml").exists()
    words = task_data.words(settings)
    assert len(words) == 370_099 and all(w.isalpha() and w.islower() for w in words[:1000])


def test_a_split_missing_from_a_local_kit_is_a_clear_error(tmp_path: Path) -> None:
    settings = TrainerSettings(base_dir=tmp_path, data_dir=tmp_path / "kit")
    with pytest.raises(FileNotFoundError, match="not in the local data kit"):
        task_data.task_rows(settings, "mmlu", "auxiliary_train")
    with pytest.raises(KeyError, match="unknown task split"):
        task_data.task_rows(settings, "mmlu", "holdout")


def test_download_writes_the_split_once_into_the_kit_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A local folder stands in for the Hugging Face repo: `datasets` loads both the same way.
    repo = tmp_path / "hub" / "gsm8k"
    repo.mkdir(parents=True)
    pq.write_table(
        pa.table({"question": ["1+1?", "2+2?"], "answer": ["#### 2", "#### 4"]}), repo / "test.parquet"
    )
    monkeypatch.setitem(
        TASK_FILES, ("gsm8k", "test"), TaskFile("gsm8k/test.parquet", str(repo), None, "test")
    )
    settings = TrainerSettings(base_dir=tmp_path / "base")
    assert task_data.task_rows(settings, "gsm8k", "test") == [
        {"question": "1+1?", "answer": "#### 2"},
        {"question": "2+2?", "answer": "#### 4"},
    ]
    written = tmp_path / "base" / "data" / "gsm8k" / "test.parquet"
    before = written.stat().st_mtime_ns
    (repo / "test.parquet").unlink()  # read from the local copy from now on
    assert len(task_data.task_rows(settings, "gsm8k", "test")) == 2
    assert written.stat().st_mtime_ns == before


def test_nested_split_is_unnested_on_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "hub" / "mmlu"
    repo.mkdir(parents=True)
    nested = {"question": "q?", "subject": "s", "choices": ["a", "b", "c", "d"], "answer": 2}
    pq.write_table(pa.table({"train": [nested]}), repo / "train.parquet")
    spec = TaskFile("mmlu/auxiliary_train.parquet", str(repo), None, "train", unnest="train")
    monkeypatch.setitem(TASK_FILES, ("mmlu", "auxiliary_train"), spec)
    rows = task_data.task_rows(TrainerSettings(base_dir=tmp_path / "base"), "mmlu", "auxiliary_train")
    assert rows == [nested]


def test_eval_bundle_and_words_download_from_their_sources(tmp_path: Path) -> None:
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("eval_bundle/core.yaml", "icl_tasks: []\n")
        bundle.writestr("eval_bundle/eval_data/world_knowledge/x.jsonl", "{}\n")
    word_file = tmp_path / "words_alpha.txt"
    word_file.write_bytes(b"aardvark\r\nabacus\r\n")
    settings = TrainerSettings(base_dir=tmp_path / "base")
    folder = task_data.eval_bundle_dir(settings, url=str(archive))
    assert (folder / "core.yaml").read_text() == "icl_tasks: []\n"
    assert (folder / "eval_data" / "world_knowledge" / "x.jsonl").exists()
    assert sorted(p.name for p in folder.parent.iterdir()) == ["eval_bundle"]  # no zip or temp folder left
    assert task_data.words(settings, url=str(word_file)) == ["aardvark", "abacus"]
