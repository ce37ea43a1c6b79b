"""
What an evaluation costs: wall time of CORE on a d4 model with --max-per-task 100, and of each chat eval
at 100 problems, each run as its own process (start-up included), as a user would run them.

The model is a d4 (head dim 64, seq 512, vocab 8,192) trained for a few steps on the data kit: timing
depends on the shapes, not on what the model knows (an untrained model writes to the token limit on
generative tasks, which is the slow case). The same checkpoint stands in for the SFT model.

    .venv/bin/python bench/evals.py [--max-per-task 100] [--max-problems 100] [--max-new-tokens 512]
        [--chat-tasks GSM8K HumanEval] [--no-core]
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

from trainer.runtime import cpu_has_bfloat16_matmul

ROOT = Path(__file__).resolve().parent.parent
TRAIN = (
    "--depth 4 --head-dim 64 --window-pattern L --max-seq-len 512 --device-batch-size 8 "
    "--total-batch-size 4096 --num-iterations 20 --eval-every 0 --eval-tokens 4096 --sample-every 0 "
    "--core-metric-every -1"
)
CHAT_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]


def timed(args: list[str], env: dict[str, str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.run(
            [sys.executable, "-m", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    if code != 0:
        raise SystemExit(f"{args[0]} exited with {code}; the end of {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-per-task", type=int, default=100)
    parser.add_argument("--max-problems", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    # bf16 where the CPU multiplies it natively; elsewhere its scalar fallback is tens of times slower
    parser.add_argument("--dtype", default="bfloat16" if cpu_has_bfloat16_matmul() else "float32")
    parser.add_argument("--chat-tasks", nargs="+", default=CHAT_TASKS, choices=CHAT_TASKS)
    parser.add_argument("--no-core", dest="core", action="store_false", help="skip the CORE measurement")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("NANOCHAT_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()
    if not (data_dir / "eval_bundle").is_dir():
        raise SystemExit(f"no data kit at {data_dir}: set NANOCHAT_DATA_DIR to one")
    base = Path(tempfile.mkdtemp(prefix="nanochat-evals-"))
    env = {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base),
        "NANOCHAT_DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
    }
    timed(["trainer.tok_train", "--run", "bench", "--vocab-size", "8192"], env, base / "tok_train.log")
    train = ["trainer.base_train", "--run", "bench", *TRAIN.split(), "--dtype", args.dtype]
    timed(train, env, base / "base_train.log")
    run = base / "runs" / "bench"
    shutil.copytree(run / "base", run / "sft", ignore=shutil.ignore_patterns("metrics.jsonl"))

    results = []
    if args.core:
        core_args = ["--run", "bench", "--eval", "core", "--max-per-task", str(args.max_per_task)]
        seconds = timed(["trainer.base_eval", *core_args, "--dtype", args.dtype], env, base / "core.log")
        tasks = len(json.loads((run / "report" / "base_eval.json").read_text())["core_per_task"])
        results.append({"eval": f"CORE ({tasks} tasks × {args.max_per_task})", "seconds": round(seconds, 1)})
    for task in args.chat_tasks:
        chat_args = [
            *("--run", "bench", "-i", "sft", "-a", task, "--max-problems", str(args.max_problems)),
            *("--max-new-tokens", str(args.max_new_tokens), "--dtype", args.dtype),
        ]
        seconds = timed(["trainer.chat_eval", *chat_args], env, base / f"chat_eval_{task}.log")
        results.append({"eval": f"{task} ({args.max_problems} problems)", "seconds": round(seconds, 1)})

    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"evaluation cost | {machine} | d4 model, {args.dtype}, max new tokens {args.max_new_tokens}")
    print(f"{'evaluation':<32} {'wall s':>8}")
    for r in results:
        print(f"{r['eval']:<32} {r['seconds']:>8.1f}")
    print(f"logs in {base}")
    print(json.dumps({"bench": "evals", "machine": machine, "dtype": args.dtype, "results": results}))


if __name__ == "__main__":
    main()
