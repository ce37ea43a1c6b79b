"""
Base pretraining on the reference recipe's CPU configuration (../shared/RECIPE.md, last table), measured
the way the reference reports it: d4, head dim 64, window L, seq 512, 4,096 tokens/step, 300 steps,
vocab 8,192 trained on the data kit, compiled, val bpb over 262,144 tokens every 100 steps.

For each dtype it runs `python -m trainer.base_train` as its own process and prints tok/s (median step),
training time (the reference's meaning: the steps after the first 11), the first step's time
(compilation), the whole process's wall time and peak RSS, and val bpb at every eval step; then a table
and one JSON line. Extra base_train flags measure a lever against the same baseline.

    .venv/bin/python bench/reference.py [--dtypes bfloat16 float32] [--flags "--weight-decay-horizon trained"]
        [--base-dir DIR]          # data: NANOCHAT_DATA_DIR (default ../shared/data)
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = (
    "--depth 4 --head-dim 64 --window-pattern L --max-seq-len 512 --device-batch-size 8 "
    "--total-batch-size 4096 --num-iterations 300 --eval-every 100 --eval-tokens 262144 "
    "--sample-every 0 --core-metric-every -1 --save-every 0 --compile"
)
VOCAB_SIZE = 8192
ROOT = Path(__file__).resolve().parent.parent


def run_program(args: list[str], env: dict[str, str], log: Path) -> dict:
    """Run `python -m <args>`, its output to `log`; wall seconds and peak RSS of that process alone."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not all children's
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{args[0]} exited with {code}; the end of {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": time.perf_counter() - start, "peak_rss_mb": usage.ru_maxrss / 1024}


def measure(base: Path, env: dict[str, str], dtype: str, flags: str) -> dict:
    run = f"reference-{dtype}"
    run_dir = base / "runs" / run
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(base / "runs" / "bench-tokenizer" / "tokenizer", run_dir / "tokenizer")
    args = ["trainer.base_train", "--run", run, *CONFIG.split(), "--dtype", dtype, *flags.split()]
    process = run_program(args, env, base / f"{run}.log")
    summary = json.loads((run_dir / "report" / "base_train.json").read_text())
    records = [json.loads(line) for line in (run_dir / "base" / "metrics.jsonl").read_text().splitlines()]
    return {
        "dtype": dtype,
        "flags": flags,
        "tok_per_s": summary["tok_per_s"],
        "training_min": summary["training_minutes"],
        "first_step_s": round(next(r["dt"] for r in records if r["step"] == 1), 1),
        "process_min": round(process["wall_s"] / 60, 2),
        "peak_rss_gb": round(process["peak_rss_mb"] / 1024, 2),
        "val_bpb": {r["step"]: round(r["val_bpb"], 4) for r in records if "val_bpb" in r},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--flags", default="", help="extra base_train flags, e.g. a lever to measure")
    parser.add_argument("--base-dir", type=Path, default=None, help="keep runs here (default: a temp dir)")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("NANOCHAT_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()
    if not (data_dir / "pretrain").is_dir():
        raise SystemExit(f"no data kit at {data_dir}: set NANOCHAT_DATA_DIR to one")
    base = (args.base_dir or Path(tempfile.mkdtemp(prefix="nanochat-bench-"))).resolve()
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_DATA_DIR": str(data_dir)}
    env["PYTHONUNBUFFERED"] = "1"
    if not (base / "runs" / "bench-tokenizer" / "tokenizer").is_dir():
        tokenizer_args = ["trainer.tok_train", "--run", "bench-tokenizer", "--vocab-size", str(VOCAB_SIZE)]
        run_program(tokenizer_args, env, base / "tok_train.log")
    results = [measure(base, env, dtype, args.flags) for dtype in args.dtypes]

    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"reference CPU configuration | {machine} | {CONFIG} {args.flags}".rstrip())
    eval_steps = sorted({step for r in results for step in r["val_bpb"]})
    header = f"{'dtype':>9} {'tok/s':>7} {'train min':>9} {'step 1 s':>8} {'process min':>11} {'RSS GB':>6}"
    print(header + "".join(f" {'bpb@' + str(s):>9}" for s in eval_steps))
    for r in results:
        row = (
            f"{r['dtype']:>9} {r['tok_per_s']:>7,} {r['training_min']:>9.2f} {r['first_step_s']:>8.1f} "
            f"{r['process_min']:>11.2f} {r['peak_rss_gb']:>6.2f}"
        )
        print(row + "".join(f" {r['val_bpb'].get(s, float('nan')):>9.4f}" for s in eval_steps))
    print(f"runs kept in {base}")
    print(json.dumps({"bench": "reference", "machine": machine, "config": CONFIG, "results": results}))


if __name__ == "__main__":
    main()
