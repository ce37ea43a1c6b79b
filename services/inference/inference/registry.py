"""
Which checkpoints can be served, and their model ids. The runs folder is read on every lookup (a
directory listing), so a checkpoint written while the server runs is servable at once:

    <run>-<stage>-<step>   one checkpoint, e.g. demo-sft-000420 → runs/demo/sft/step_000420
    <run>-<stage>          the stage's latest step
    default                INFERENCE_DEFAULT_MODEL, else the newest chat checkpoint (rl, sft, mid),
                           else the newest base checkpoint
"""

from dataclasses import dataclass
from pathlib import Path

from trainer.checkpoint import list_steps, step_dir

STAGES = ("base", "mid", "sft", "rl")
CHAT_STAGES = ("mid", "sft", "rl")
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
