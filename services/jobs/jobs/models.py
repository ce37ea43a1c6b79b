"""
The model registry: which checkpoints exist, and their model ids (the API lists them, the inference
service serves them). The runs folder is read on every lookup (a directory listing), so a checkpoint
written a moment ago is there at once:

    <run>-<stage>-<step>   one checkpoint, e.g. demo-sft-000420 → runs/demo/sft/step_000420
    <run>-<stage>          the stage's latest step
    default                INFERENCE_DEFAULT_MODEL, else the newest chat checkpoint (rl, sft, mid),
                           else the newest base checkpoint

A checkpoint exported by trainer.export is runs/<run>/exports/<id>/ (a Hugging Face folder) and
<id>.tar beside it, renamed into place complete.
"""

import contextlib
import glob
import json
import math
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.specs import NAME_PATTERN

STAGES = ("base", "mid", "sft", "rl")
STEP_DIR = re.compile(r"^step_([0-9]{6})$")  # the trainer's checkpoint folders (trainer.checkpoint)
CHAT_STAGES = ("mid", "sft", "rl")
MODEL_ID = re.compile(r"^(.+)-(base|mid|sft|rl)-([0-9]{6})$")  # run names may hold '-': the stage is the last
DEFAULT = "default"


@dataclass(frozen=True)
class Checkpoint:
    run: str
    stage: str
    step: int
    path: Path

    @property
    def id(self) -> str:
        return f"{self.run}-{self.stage}-{self.step:06d}"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path.parent.parent / "tokenizer"

    @property
    def created(self) -> int:
        return int((self.path / "meta.json").stat().st_mtime)


def export_tarball(runs_dir: Path, model_id: str) -> Path:
    """Where trainer.export puts a checkpoint's tarball (an id the API has checked: `<run>-<stage>-<step>`).
    Found by its id alone, so it stays downloadable after its checkpoint is deleted or pruned."""
    if (match := MODEL_ID.fullmatch(model_id)) is None:
        raise UnknownModel(f"`{model_id}` is not a checkpoint's id (<run>-<stage>-<step>).")
    return runs_dir / match.group(1) / "exports" / f"{model_id}.tar"


def export_folder(runs_dir: Path, model_id: str) -> Path:
    """Where trainer.export puts a checkpoint's Hugging Face folder: beside its tarball."""
    return export_tarball(runs_dir, model_id).with_suffix("")


def list_exports(runs_dir: Path) -> list[Path]:
    """The tarball of every export in place (runs/<run>/exports/<id>.tar), whether or not its checkpoint
    still exists. An id whose run is not the folder it lies in, or not a run name the API takes (so
    that it could not be downloaded or deleted by its id), is not an export of ours."""
    exports = []
    for run in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if re.fullmatch(NAME_PATTERN, run.name):
            tarballs = sorted(run.glob("exports/*.tar"))
            exports += [t for t in tarballs if (m := MODEL_ID.fullmatch(t.stem)) and m[1] == run.name]
    return exports


def delete_export(runs_dir: Path, model_id: str) -> bool:
    """Remove a checkpoint's export: its tarball first (so that it is never offered for download half
    removed), its folder, and what an export that was stopped or killed left beside them (`.<id>.tar.tmp`,
    `.<id>.tmp-*`, `.<id>.old-*`). False when there is none of it. The checkpoint itself stays. Only
    while no export of the run is running: it would be writing those."""
    tarball, folder = export_tarball(runs_dir, model_id), export_folder(runs_dir, model_id)
    exports = tarball.parent
    leftovers = sorted(exports.glob(glob.escape(f".{model_id}.") + "*")) if exports.is_dir() else []
    found = [path for path in (tarball, folder, *leftovers) if path.exists() or path.is_symlink()]
    for path in found:
        with contextlib.suppress(FileNotFoundError):  # removed or replaced meanwhile: gone all the same
            if path.is_dir() and not path.is_symlink():
                # Renamed aside in one step first: a folder swapped in meanwhile is never removed half.
                aside = exports / f".{model_id}.old-{secrets.token_hex(4)}"
                path.rename(aside)
                shutil.rmtree(aside)
            else:
                path.unlink()
    return bool(found)


def list_steps(folder: Path) -> list[int]:
    """Steps with a complete checkpoint (its meta.json is written last), oldest first."""
    if not folder.is_dir():
        return []
    steps = [int(m.group(1)) for p in folder.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(s for s in steps if (step_dir(folder, s) / "meta.json").exists())


def step_dir(folder: Path, step: int) -> Path:
    return folder / f"step_{step:06d}"


class UnknownModel(LookupError):
    pass


def scan(runs_dir: Path) -> list[Checkpoint]:
    """Every complete checkpoint of a run that has a tokenizer, oldest step first per stage."""
    found = []
    for run in sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []:
        if not (run / "tokenizer").is_dir():
            continue
        for stage in STAGES:
            folder = run / stage
            found += [Checkpoint(run.name, stage, s, step_dir(folder, s)) for s in list_steps(folder)]
    return found


def model_ids(runs_dir: Path, default_model: str | None = None) -> dict[str, Checkpoint]:
    """Every id a request may name, each with the checkpoint it serves; `default` first."""
    checkpoints = scan(runs_dir)
    ids: dict[str, Checkpoint] = {}
    for checkpoint in checkpoints:  # later steps overwrite the stage alias: it ends on the latest
        ids[checkpoint.id] = checkpoint
        ids[f"{checkpoint.run}-{checkpoint.stage}"] = checkpoint
    default = ids.get(default_model) if default_model else newest(checkpoints)
    return {DEFAULT: default, **ids} if default else ids


def newest(checkpoints: list[Checkpoint]) -> Checkpoint | None:
    chat = [c for c in checkpoints if c.stage in CHAT_STAGES]
    candidates = chat or checkpoints
    return max(candidates, key=lambda c: (c.created, c.step)) if candidates else None


def resolve(runs_dir: Path, model: str, default_model: str | None = None) -> Checkpoint:
    ids = model_ids(runs_dir, default_model)
    if model not in ids:
        raise UnknownModel(f"The model `{model}` does not exist.")
    return ids[model]


def find(runs_dir: Path, model_id: str) -> Checkpoint:
    """The one checkpoint `<run>-<stage>-<step>` names (aliases are not accepted here)."""
    for checkpoint in scan(runs_dir):
        if checkpoint.id == model_id:
            return checkpoint
    raise UnknownModel(f"The model `{model_id}` does not exist (name one checkpoint: <run>-<stage>-<step>).")


def parameter_count(checkpoint: Checkpoint) -> int:
    """From the safetensors header (shapes only: no tensor is read)."""
    with open(checkpoint.path / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


# The report sections that describe a stage's model: its training program's, then its evaluation's.
STAGE_SECTIONS = {
    "base": ("base_train", "base_eval"),
    "mid": ("mid_train", "chat_eval_mid"),
    "sft": ("chat_sft", "chat_eval_sft"),
    "rl": ("chat_rl", "chat_eval_rl"),
}


def report_numbers(runs_dir: Path, checkpoint: Checkpoint) -> dict[str, Any]:
    """The stage's numeric results from the run's report (val bpb, CORE, task accuracies, …)."""
    numbers: dict[str, Any] = {}
    for section in STAGE_SECTIONS[checkpoint.stage]:
        path = runs_dir / checkpoint.run / "report" / f"{section}.json"
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            numbers |= {
                k: v for k, v in data.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
    return numbers


def delete(checkpoint: Checkpoint) -> None:
    """Remove a checkpoint's folder; its meta.json goes first, so a half-removed one is never listed."""
    (checkpoint.path / "meta.json").unlink()
    shutil.rmtree(checkpoint.path)
