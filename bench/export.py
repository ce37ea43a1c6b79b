"""
An export scored by EleutherAI's lm-evaluation-harness agrees with our own evaluation of the same
checkpoint: ARC-Easy from the data kit (every problem), through `trainer.chat_eval` (what a chat_eval job
runs) and through lm-eval's `hf` model on `trainer.export`'s folder, for both export architectures.

lm-eval scores ARC-Easy here as our chat evaluation does (the same prompt through the chat template, the
answer letter right after <|assistant_start|>: `multiple_choice` over the letters picks the likeliest,
which is what comparing the letters' logits picks), from a task file this bench writes for the kit's
parquet (lm-eval's own arc_easy downloads the dataset and scores the answer texts, another metric).

The models are d4s (head dim 64, seq 512, vocab 8,192, float32) trained for a few steps on the data kit,
one per architecture: ours (remote code) and the one transformers' NanoChat class computes. What matters
is that both sides agree, not the score.

    pip install lm_eval==0.4.13 accelerate==1.16.0   # not in requirements-dev.txt: ~40 packages
    .venv/bin/python bench/export.py [--steps 20] [--limit N]
"""

import argparse
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from evals import timed  # bench/ is on sys.path: the script's folder

from trainer.tasks import shuffled

ROOT = Path(__file__).resolve().parent.parent
TRAIN = (
    "--depth 4 --head-dim 64 --max-seq-len 512 --device-batch-size 8 --total-batch-size 4096 "
    "--eval-every 0 --eval-tokens 4096 --sample-every 0 --core-metric-every -1 --dtype float32"
)
ARCHITECTURES = {
    "ours (remote code)": "",
    "built-in NanoChat": "--window-pattern L --no-value-embeds --no-smear --no-backout --no-layer-scalars "
    "--qk-scale 1",
}
TASK = """task: arc_easy_kit_chat
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
test_split: test
output_type: multiple_choice
doc_to_text: "Multiple Choice question: {{{{question}}}}\\n{{% for i in range(choices.label|length) %}}\
- {{{{choices.text[i]}}}}={{{{choices.label[i]}}}}\\n{{% endfor %}}\\nRespond only with the letter of the \
correct answer."
doc_to_choice: "{{{{choices.label}}}}"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def lm_eval_accuracy(folder: Path, task_dir: Path, problems: list[int]) -> tuple[float, int, float]:
    """(accuracy, problems, seconds) of lm-eval's hf model on the export folder, over the kit's rows
    `problems` (chat_eval's first N after its shuffle: the same problems on both sides)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    started = time.perf_counter()
    results = simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},trust_remote_code=True,dtype=float32",
        tasks=["arc_easy_kit_chat"],
        task_manager=TaskManager(include_path=str(task_dir)),
        apply_chat_template=True,
        batch_size=32,
        samples={"arc_easy_kit_chat": problems},
        device="cpu",
    )
    score = results["results"]["arc_easy_kit_chat"]["acc,none"]
    return score, results["n-samples"]["arc_easy_kit_chat"]["effective"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="base training steps of each model")
    parser.add_argument(
        "--limit", type=int, default=None, help="chat_eval's first N problems, on both sides (default: all)"
    )
    args = parser.parse_args()
    if importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("accelerate") is None:
        raise SystemExit("this bench needs lm-eval: pip install lm_eval==0.4.13 accelerate==1.16.0")
    data_dir = Path(os.environ.get("NANOCHAT_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()
    parquet = data_dir / "arc" / "ARC-Easy" / "test.parquet"
    if not parquet.exists():
        raise SystemExit(f"no ARC-Easy in the data kit at {data_dir}: set NANOCHAT_DATA_DIR to one")
    base = Path(tempfile.mkdtemp(prefix="nanochat-export-bench-"))
    env = {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base),
        "NANOCHAT_DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
    }
    (base / "tasks").mkdir()
    (base / "tasks" / "arc_easy_kit_chat.yaml").write_text(TASK.format(parquet=parquet))
    timed(["trainer.tok_train", "--run", "tok", "--vocab-size", "8192"], env, base / "tok_train.log")

    rows = []
    for i, (name, flags) in enumerate(ARCHITECTURES.items()):
        model = f"m{i}"
        (base / "runs" / model).mkdir(parents=True)
        os.symlink(base / "runs" / "tok" / "tokenizer", base / "runs" / model / "tokenizer")
        train = [
            "trainer.base_train",
            "--run",
            model,
            *TRAIN.split(),
            *flags.split(),
            "--num-iterations",
            str(args.steps),
        ]
        timed(train, env, base / f"{model}_base_train.log")
        run_dir = (
            base / "runs" / model
        )  # the base checkpoint stands in for a chat model (chat_eval reads those)
        shutil.copytree(run_dir / "base", run_dir / "sft", ignore=shutil.ignore_patterns("metrics.jsonl"))
        timed(["trainer.export", "--run", model, "--stage", "sft"], env, base / f"{model}_export.log")
        ours_args = ["--run", model, "-i", "sft", "-a", "ARC-Easy", "--dtype", "float32"]
        ours_args += ["--max-problems", str(args.limit)] if args.limit else []
        seconds = timed(["trainer.chat_eval", *ours_args], env, base / f"{model}_chat_eval.log")
        ours = json.loads((run_dir / "report" / "chat_eval_sft.json").read_text())
        section = json.loads((run_dir / "report" / "export.json").read_text())
        rows_in_kit = pq.read_metadata(parquet).num_rows
        problems = shuffled(list(range(rows_in_kit)))[: args.limit]
        accuracy, problems, lm_seconds = lm_eval_accuracy(Path(section["path"]), base / "tasks", problems)
        agree = round(accuracy, 4) == ours["ARC-Easy"]  # chat_eval reports 4 decimals
        rows.append({
            "architecture": name, "exported_as": section["architecture"], "problems": problems,
            "chat_eval": ours["ARC-Easy"], "lm_eval": accuracy, "agree": agree,
            "chat_eval_s": round(seconds, 1), "lm_eval_s": round(lm_seconds, 1),
        })  # fmt: skip

    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"ARC-Easy (data kit) through trainer.chat_eval and lm-eval on the export | {machine}")
    header = ("architecture", "exported as", "problems", "chat_eval", "lm-eval", "agree")
    print("{:<20} {:<26} {:>8} {:>10} {:>8} {:>6}".format(*header))
    for r in rows:
        print(
            f"{r['architecture']:<20} {r['exported_as']:<26} {r['problems']:>8} {r['chat_eval']:>10.4f} "
            f"{r['lm_eval']:>8.4f} {'yes' if r['agree'] else 'NO':>6}"
        )
    print(f"logs in {base}")
    print(json.dumps({"bench": "export", "machine": machine, "steps": args.steps, "results": rows}))


if __name__ == "__main__":
    main()
