"""
The task datasets (chat SFT, GSM8K, MMLU, ARC, HumanEval), the CORE eval bundle, the word list and the
reference's identity conversations, in the data kit's layout under the data root. A local kit
(NANOCHAT_DATA_DIR) is read as it is; otherwise a missing file is downloaded once into
$NANOCHAT_BASE_DIR/data/ (Hugging Face datasets through `datasets`, the rest over HTTP) and read from
there ever after.
"""

import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from trainer.common import make_temp_dir, replace_dir
from trainer.download import fetch
from trainer.settings import TrainerSettings

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
# nanochat's 1,000 synthetic conversations about who the model is (dev/gen_synthetic_data.py made them).
IDENTITY_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"


@dataclass(frozen=True)
class TaskFile:
    path: str  # under the data root, as in the kit
    repo: str  # Hugging Face dataset id (or a local folder that `datasets` can load)
    config: str | None
    split: str
    unnest: str | None = None  # a struct column whose fields become the columns (MMLU auxiliary_train)


TASK_FILES: dict[tuple[str, str], TaskFile] = {
    ("smoltalk", "train"): TaskFile("sft/train.parquet", "HuggingFaceTB/smol-smoltalk", None, "train"),
    ("smoltalk", "test"): TaskFile("sft/test.parquet", "HuggingFaceTB/smol-smoltalk", None, "test"),
    ("gsm8k", "train"): TaskFile("gsm8k/train.parquet", "openai/gsm8k", "main", "train"),
    ("gsm8k", "test"): TaskFile("gsm8k/test.parquet", "openai/gsm8k", "main", "test"),
    ("mmlu", "dev"): TaskFile("mmlu/dev.parquet", "cais/mmlu", "all", "dev"),
    ("mmlu", "validation"): TaskFile("mmlu/validation.parquet", "cais/mmlu", "all", "validation"),
    ("mmlu", "test"): TaskFile("mmlu/test.parquet", "cais/mmlu", "all", "test"),
    ("mmlu", "auxiliary_train"): TaskFile(
        "mmlu/auxiliary_train.parquet", "cais/mmlu", "auxiliary_train", "train", unnest="train"
    ),
    ("humaneval", "test"): TaskFile("humaneval/test.parquet", "openai/openai_humaneval", None, "test"),
    **{
        (f"arc-{level.lower()}", split): TaskFile(
            f"arc/ARC-{level}/{split}.parquet", "allenai/ai2_arc", f"ARC-{level}", split
        )
        for level in ("Easy", "Challenge")
        for split in ("train", "validation", "test")
    },
}


def task_path(settings: TrainerSettings, task: str, split: str) -> Path:
    """The task file on disk, downloaded first when it is missing and downloads are allowed."""
    if (task, split) not in TASK_FILES:
        known = ", ".join(f"{t}/{s}" for t, s in TASK_FILES)
        raise KeyError(f"unknown task split {task}/{split}; known: {known}")
    spec = TASK_FILES[(task, split)]
    path = settings.data_root / spec.path
    if not path.exists():
        if not settings.downloads_allowed:
            raise FileNotFoundError(
                f"{path} is not in the local data kit (NANOCHAT_DATA_DIR={settings.data_dir})"
            )
        download_task_file(spec, path)
    return path


def task_rows(settings: TrainerSettings, task: str, split: str) -> list[dict[str, Any]]:
    return pq.read_table(task_path(settings, task, split)).to_pylist()


def download_task_file(spec: TaskFile, dest: Path) -> None:
    """Load the split with `datasets` and write it as one parquet file (temp file, then rename)."""
    from datasets import load_dataset  # heavy import, only needed for downloads

    print(f"downloading {spec.repo} ({spec.config or 'default'}, {spec.split}) to {dest}", flush=True)
    rows = load_dataset(spec.repo, spec.config, split=spec.split)
    if spec.unnest:
        rows = rows.map(lambda row: row[spec.unnest], remove_columns=[spec.unnest])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    rows.to_parquet(str(tmp))
    tmp.replace(dest)


def eval_bundle_dir(settings: TrainerSettings, url: str = EVAL_BUNDLE_URL) -> Path:
    """The CORE eval bundle folder (core.yaml, eval_meta_data.csv, eval_data/)."""
    folder = settings.data_root / "eval_bundle"
    if (folder / "core.yaml").exists():
        return folder
    if not settings.downloads_allowed:
        raise FileNotFoundError(f"{folder}/core.yaml is not in the local data kit")
    archive = fetch(url, settings.data_root / "eval_bundle.zip", check=zipfile.ZipFile)
    tmp = make_temp_dir(folder)
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(tmp)
    # nanochat's archive holds one top folder, eval_bundle/; accept a flat archive too.
    replace_dir(tmp / "eval_bundle" if (tmp / "eval_bundle").is_dir() else tmp, folder)
    shutil.rmtree(tmp, ignore_errors=True)
    archive.unlink()
    return folder


def words(settings: TrainerSettings, url: str = WORDS_URL) -> list[str]:
    """The English word list (one lower-case word a line; the file has CRLF line ends)."""
    return downloaded_file(settings, "words/words_alpha.txt", url).read_text(encoding="utf-8").split()


def identity_path(settings: TrainerSettings, url: str = IDENTITY_URL) -> Path:
    """The reference's identity conversations (CustomJSON: a list of messages a line)."""
    return downloaded_file(settings, "identity/identity_conversations.jsonl", url)


def downloaded_file(settings: TrainerSettings, relative: str, url: str) -> Path:
    """A file of the data kit, fetched from `url` once when it is missing and downloads are allowed."""
    path = settings.data_root / relative
    if not path.exists():
        if not settings.downloads_allowed:
            raise FileNotFoundError(f"{path} is not in the local data kit")
        fetch(url, path)
    return path
