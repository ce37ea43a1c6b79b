"""
A run's report: each program writes its section as runs/<run>/report/<section>.json, and report.md
is rebuilt from all sections so a person can read the whole run at a glance.
"""

import json
from pathlib import Path
from typing import Any

from trainer.common import atomic_write_json, atomic_write_text
from trainer.settings import TrainerSettings


def report_dir(settings: TrainerSettings, run: str) -> Path:
    return settings.run_dir(run) / "report"


def write_section(
    settings: TrainerSettings,
    run: str,
    section: str,
    data: dict[str, Any],
    figures: dict[str, str] | None = None,
) -> Path:
    """The program's summary as <section>.json, and any SVG charts (name → SVG) beside it; report.md
    is rebuilt once, after all of them are in place."""
    folder = report_dir(settings, run)
    path = folder / f"{section}.json"
    atomic_write_json(path, data)
    for name, svg in (figures or {}).items():
        atomic_write_text(folder / f"{name}.svg", svg)
    atomic_write_text(folder / "report.md", render_markdown(run, folder))
    return path


def render_markdown(run: str, folder: Path) -> str:
    lines = [f"# nanochat run `{run}`", ""]
    for figure in sorted(folder.glob("*.svg")):
        lines += [f"![{figure.stem}]({figure.name})", ""]
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime):
        lines += [f"## {path.stem}", "", "| key | value |", "|---|---|"]
        for key, value in json.loads(path.read_text(encoding="utf-8")).items():
            shown = f"{value:,.4g}" if isinstance(value, float) else value
            lines.append(f"| {key} | {shown} |")
        lines.append("")
    return "\n".join(lines)
