"""
A run's report card. Each program writes its section as runs/<run>/report/<section>.json (config,
timings, key metrics) and the environment it ran in; report.md is rebuilt from all of them:

- the system (code version, Python/torch, CPU, GPUs) and a cost estimate: GPU-hours × the
  NANOCHAT_GPU_HOUR_PRICE setting (CPU-hours are listed, not priced);
- a BASE / MID / SFT / RL table of CORE, ARC-Easy, ARC-Challenge, MMLU, GSM8K, HumanEval,
  SpellingBee and ChatCORE;
- PNG charts (matplotlib) of train loss, val bpb, tok/s, MFU and RL reward against step, a line per
  stage, from each stage's metrics.jsonl;
- every section's values.

    python -m trainer.report --run demo      # rebuild and print where report.md is
"""

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from trainer.common import add_run_flag, atomic_write_json, atomic_write_text, git_commit
from trainer.settings import TrainerSettings

STAGES = ("base", "mid", "sft", "rl")
TABLE_COLUMNS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE"]
CHARTS = {  # file stem → (metrics.jsonl key, y label)
    "train_loss": ("loss", "train loss"),
    "val_bpb": ("val_bpb", "val bits per byte"),
    "tok_per_s": ("tok_per_s", "tokens / s"),
    "mfu": ("mfu", "MFU"),
    "reward": ("reward", "RL mean reward"),
}


def report_dir(settings: TrainerSettings, run: str) -> Path:
    return settings.run_dir(run) / "report"


def system_info() -> dict[str, Any]:
    """Where a program ran: code version, software, CPU and GPUs."""
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "code": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "gpus": f"{gpus[0]} × {len(gpus)}" if gpus else "none",
    }


def write_section(
    settings: TrainerSettings, run: str, section: str, data: dict[str, Any], config: dict[str, Any]
) -> Path:
    """The program's results as <section>.json, with its flags (`config`) and the system it ran on;
    report.md is rebuilt."""
    folder = report_dir(settings, run)
    path = folder / f"{section}.json"
    atomic_write_json(path, {**data, "config": config, "system": system_info()})
    render(settings, run)
    return path


def read_sections(folder: Path) -> dict[str, dict]:
    """Every section, oldest first."""
    paths = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)
    return {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in paths}


def stage_metrics(settings: TrainerSettings, run: str) -> dict[str, list[dict]]:
    """Each stage's metrics.jsonl records."""
    metrics = {}
    for stage in STAGES:
        path = settings.run_dir(run) / stage / "metrics.jsonl"
        if path.exists():
            metrics[stage] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return metrics


def draw_charts(metrics: dict[str, list[dict]], folder: Path) -> list[str]:
    """One PNG per metric that some stage logged, a line per stage; returns the file names."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = []
    for stem, (key, label) in CHARTS.items():
        series = {
            stage: [(r["step"], r[key]) for r in records if r.get(key) is not None]
            for stage, records in metrics.items()
        }
        series = {stage: points for stage, points in series.items() if points}
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(7, 3.8), dpi=110)
        for stage, points in series.items():
            steps, values = zip(*points, strict=True)
            axes.plot(steps, values, label=stage, marker="o" if len(points) < 30 else None, markersize=3)
        axes.set(xlabel="step", ylabel=label, title=label)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        tmp = folder / f".{stem}.png.tmp"
        figure.savefig(tmp, format="png")
        plt.close(figure)
        tmp.replace(folder / f"{stem}.png")
        names.append(f"{stem}.png")
    return names


def stage_scores(sections: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per stage, the table's metrics that were measured (CORE: base_eval, else base_train's last)."""
    scores: dict[str, dict[str, float]] = {stage: {} for stage in STAGES}
    core = sections.get("base_eval", {}).get("core", sections.get("base_train", {}).get("core"))
    if core is not None:
        scores["base"]["CORE"] = core
    for stage in STAGES:
        chat = sections.get(f"chat_eval_{stage}", {})
        for column in TABLE_COLUMNS[1:-1]:
            if column in chat:
                scores[stage][column] = chat[column]
        if "chatcore" in chat:
            scores[stage]["ChatCORE"] = chat["chatcore"]
    return {stage: values for stage, values in scores.items() if values}


def cost_lines(sections: dict[str, dict], price: float) -> list[str]:
    """GPU-hours (priced) and CPU-hours over every section that recorded its wall time."""
    gpu_hours = sum(s.get("gpus", 0) * s.get("wall_seconds", 0) for s in sections.values()) / 3600
    cpu_hours = sum(s.get("wall_seconds", 0) for s in sections.values() if not s.get("gpus")) / 3600
    return [
        f"- GPU time: {gpu_hours:.2f} GPU-hours × ${price:.2f}/GPU-hour ≈ **${gpu_hours * price:,.2f}**",
        f"- CPU-only time: {cpu_hours:.2f} hours (not priced)",
    ]


def format_value(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, list):
        return "<br>".join(str(v).replace("|", "\\|").replace("\n", " ") for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def section_lines(name: str, data: dict[str, Any]) -> list[str]:
    lines = [f"### {name}", "", "| key | value |", "|---|---|"]
    nested = []
    for key, value in data.items():
        if key in ("system", "config"):  # the system is at the top, the flags below
            continue
        if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()) and value:
            nested.append((key, value))
        elif isinstance(value, dict):
            lines += [f"| {key}.{k} | {format_value(v)} |" for k, v in value.items()]
        else:
            lines.append(f"| {key} | {format_value(value)} |")
    for key, rows in nested:  # e.g. CORE's per-task results: one row per task
        columns = list(next(iter(rows.values())))
        lines += ["", f"{key}:", "", "| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [
            f"| {label} | " + " | ".join(format_value(r.get(c)) for c in columns) + " |"
            for label, r in rows.items()
        ]
    if data.get("config"):
        flags = " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in data["config"].items() if v not in (None, False)
        )
        lines += ["", "<details><summary>flags</summary>", "", f"`{flags}`", "", "</details>"]
    return [*lines, ""]


def render(settings: TrainerSettings, run: str) -> Path:
    """Rebuild runs/<run>/report/report.md (and its charts) from the sections and metrics."""
    folder = report_dir(settings, run)
    folder.mkdir(parents=True, exist_ok=True)
    sections = read_sections(folder)
    charts = draw_charts(stage_metrics(settings, run), folder)
    latest_system = next((s["system"] for s in reversed(sections.values()) if "system" in s), system_info())
    lines = [f"# nanochat report card: run `{run}`", "", "## System", ""]
    lines += [f"- {key}: {value}" for key, value in latest_system.items()]
    lines += ["", "## Cost", "", *cost_lines(sections, settings.gpu_hour_price), ""]
    scores = stage_scores(sections)
    if scores:
        lines += ["## Scores", "", "| stage | " + " | ".join(TABLE_COLUMNS) + " |", "|---" * 9 + "|"]
        for stage, values in scores.items():
            cells = [f"{values[c]:.4f}" if c in values else "–" for c in TABLE_COLUMNS]
            lines.append(f"| {stage.upper()} | " + " | ".join(cells) + " |")
        lines.append("")
    if charts:
        lines += ["## Charts", "", *[f"![{Path(name).stem}]({name})" for name in charts], ""]
    lines += ["## Sections", ""]
    for name, data in sections.items():
        lines += section_lines(name, data)
    path = folder / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Rebuild a run's report card (report.md and charts).")
    add_run_flag(parser)
    args = parser.parse_args(argv)
    settings = TrainerSettings()
    if not settings.run_dir(args.run).is_dir():
        raise SystemExit(f"no run {args.run!r} in {settings.run_dir(args.run).parent}")
    path = render(settings, args.run)
    print(f"report: {path}")
    return path


if __name__ == "__main__":
    main()
