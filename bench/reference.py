"""
Base pretraining on the reference recipe's CPU configuration (../shared/RECIPE.md, last table), ours and
karpathy/nanochat itself side by side: d4, head dim 64, window L, seq 512, 4,096 tokens/step, 300 steps,
vocab 8,192 trained on the data kit, compiled, val bpb over 262,144 tokens every 100 steps. Then, with
--sft-steps, the current recipe's SFT for that many steps from the SAME base weights on both sides (the
reference's base at the first dtype and seed, imported into ours with trainer.nanochat_import).

The reference runs from a scratch checkout of REFERENCE_COMMIT (`git archive` from --nanochat, a clone of
karpathy/nanochat), with two bench-only changes: its hard-coded `torch.manual_seed(42)` reads
NANOCHAT_SEED (so it can run at several seeds), and a stand-in `wandb` module when none is installed. Its
data is the kit: pretraining shards linked into its base_data_climbmix, the chat tasks copied into its
task_data cache in the hub's parquet layout (the kit has no MMLU auxiliary_train, so both sides' SFT
mixtures are SmolTalk + GSM8K ×4).

Each run is its own process, one at a time; a table gives tok/s (median step), training time (the
reference's meaning: steps after the first 10), the first step's time (compilation), process wall time,
peak RSS and val bpb at every eval step; then one JSON line.

    .venv/bin/python bench/reference.py       # ours, seed 42, bf16 (where the CPU has it natively) and fp32
    .venv/bin/python bench/reference.py --sides ours reference --nanochat ~/nanochat \\
        --dtypes bfloat16 --seeds 42 1 2 --sft-steps 50
"""

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from trainer.runtime import cpu_has_bfloat16_matmul

REFERENCE_COMMIT = "92d63d4"
SHAPE = (
    "--depth 4 --head-dim 64 --window-pattern L --max-seq-len 512 --device-batch-size 8 "
    "--total-batch-size 4096"
)
STEPS, EVAL_EVERY, EVAL_TOKENS = 300, 100, 262144
OURS = (
    f"{SHAPE} --num-iterations {STEPS} --eval-every {EVAL_EVERY} --eval-tokens {EVAL_TOKENS} "
    "--sample-every 0 --core-metric-every -1 --save-every 0 --compile"
)
REFERENCE = (
    f"{SHAPE} --num-iterations {STEPS} --eval-every {EVAL_EVERY} --eval-tokens {EVAL_TOKENS} "
    "--sample-every -1 --core-metric-every -1 --save-every -1 --device-type cpu"
)
SFT_EVAL_TOKENS = 65536
VOCAB_SIZE = 8192
ROOT = Path(__file__).resolve().parent.parent
# The kit's chat tasks where the reference's load_hub_dataset caches them: repo--id/subset/split/.
REFERENCE_TASK_DATA = {
    "HuggingFaceTB--smol-smoltalk/default/train": "sft/train.parquet",
    "HuggingFaceTB--smol-smoltalk/default/test": "sft/test.parquet",
    "openai--gsm8k/main/train": "gsm8k/train.parquet",
    "openai--gsm8k/main/test": "gsm8k/test.parquet",
    "cais--mmlu/all/test": "mmlu/test.parquet",
}


def run_program(args: list[str], env: dict[str, str], log: Path, cwd: Path | None = None) -> dict:
    """Run `python -m <args>`, its output to `log`; wall minutes and peak RSS of that process alone."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", *args], env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not all children's
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{args[0]} exited with {code}; the end of {log}:\n{log.read_text()[-3000:]}")
    return {
        "process_min": round((time.perf_counter() - start) / 60, 2),
        "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 2),  # ru_maxrss is in KiB
    }


def raw_losses(printed: list[float], beta: float = 0.9) -> list[float]:
    """Each step's own loss from the smoothed ones chat_sft prints. Its EMA is debiased one step late
    (`step += 1` comes first), so the k-th printed value is smooth_k / (1 - beta^(k+1))."""
    smooth = [value * (1 - beta ** (k + 1)) for k, value in enumerate(printed, start=1)]
    return [(now - beta * before) / (1 - beta) for before, now in zip([0.0, *smooth], smooth, strict=False)]


class Ours:
    """This project's trainer, run from this checkout."""

    def __init__(self, base: Path, data_dir: Path) -> None:
        self.base = base
        self.env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_DATA_DIR": str(data_dir)}
        self.env["PYTHONUNBUFFERED"] = "1"
        if not (base / "runs" / "bench-tokenizer" / "tokenizer").is_dir():
            tokenizer = ["trainer.tok_train", "--run", "bench-tokenizer", "--vocab-size", str(VOCAB_SIZE)]
            run_program(tokenizer, self.env, base / "tok_train.log")

    def base_train(self, dtype: str, seed: int, flags: str) -> dict:
        run = f"reference-{dtype}-seed{seed}"
        run_dir = self.base / "runs" / run
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(self.base / "runs" / "bench-tokenizer" / "tokenizer", run_dir / "tokenizer")
        args = ["trainer.base_train", "--run", run, *OURS.split(), "--dtype", dtype, "--seed", str(seed)]
        process = run_program([*args, *flags.split()], self.env, self.base / f"{run}.log")
        summary = json.loads((run_dir / "report" / "base_train.json").read_text())
        records = self.records(run_dir / "base")
        return {
            "tok_per_s": summary["tok_per_s"],
            "training_min": summary["training_minutes"],
            "first_step_s": round(next(r["dt"] for r in records if r["step"] == 1), 1),
            **process,
            "val_bpb": recorded_val_bpb(records),
        }

    def sft(self, reference_home: Path, model_tag: str, dtype: str, steps: int) -> dict:
        """SFT from the reference's base checkpoint `model_tag`, imported as run sft-from-reference."""
        run = "sft-from-reference"
        shutil.rmtree(self.base / "runs" / run, ignore_errors=True)
        importer = ["trainer.nanochat_import", "--from", str(reference_home), "--model-tag", model_tag]
        run_program([*importer, "--run", run], self.env, self.base / "import.log")
        args = [
            "trainer.chat_sft", "--run", run, "--no-load-optimizer", "--num-iterations", str(steps),
            "--eval-every", str(steps), "--eval-tokens", str(SFT_EVAL_TOKENS), "--chatcore-every", "-1",
            "--dtype", dtype, "--compile", "--save-every", "0",
        ]  # fmt: skip
        process = run_program(args, self.env, self.base / "sft.log")
        records = self.records(self.base / "runs" / run / "sft")
        losses = [r["loss"] for r in sorted(records, key=lambda r: r["step"]) if "loss" in r]
        return {
            "loss": [round(x, 4) for x in losses],
            **process,
            "val_bpb": recorded_val_bpb(records),
        }

    @staticmethod
    def records(stage_dir: Path) -> list[dict]:
        return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


class Reference:
    """karpathy/nanochat at REFERENCE_COMMIT, from a scratch checkout, on the kit's data."""

    def __init__(self, base: Path, data_dir: Path, clone: Path) -> None:
        workspace = base / "nanochat"
        self.logs = base
        self.source, self.home = workspace / "src", workspace / "home"
        if not self.source.is_dir():
            self.checkout(clone, workspace)
        self.env = {**os.environ, "NANOCHAT_BASE_DIR": str(self.home), "PYTHONUNBUFFERED": "1"}
        self.env["PYTHONPATH"] = os.pathsep.join([str(self.source), str(workspace / "stubs")])
        shards = self.home / "base_data_climbmix"
        shards.mkdir(parents=True, exist_ok=True)
        for shard in sorted((data_dir / "pretrain").glob("*.parquet")):
            if not (shards / shard.name).exists():
                (shards / shard.name).symlink_to(shard)
        for folder, kit_file in REFERENCE_TASK_DATA.items():
            target = self.home / "task_data" / folder
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(data_dir / kit_file, target / "00000.parquet")
            (target / "manifest.json").write_text(json.dumps(["00000.parquet"]))
        if not (self.home / "tokenizer" / "tokenizer.pkl").exists():
            tokenizer = ["scripts.tok_train", "--vocab-size", str(VOCAB_SIZE)]
            run_program(tokenizer, self.env, base / "nanochat-tok_train.log", cwd=self.source)

    @staticmethod
    def checkout(clone: Path, workspace: Path) -> None:
        source = workspace / "src"
        source.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(clone), "archive", REFERENCE_COMMIT], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        common = source / "nanochat" / "common.py"
        text = common.read_text()
        seeded = 'int(os.environ.get("NANOCHAT_SEED", "42"))'
        if text.count("manual_seed(42)") != 2:
            raise SystemExit(f"{common}: expected two manual_seed(42) calls to make the seed a variable")
        common.write_text(text.replace("manual_seed(42)", f"manual_seed({seeded})"))
        stubs = workspace / "stubs"
        stubs.mkdir()
        if subprocess.run([sys.executable, "-c", "import wandb"], capture_output=True).returncode != 0:
            stub = "def init(*args, **kwargs):\n    raise RuntimeError('wandb is not installed')\n"
            (stubs / "wandb.py").write_text(stub)

    def base_train(self, dtype: str, seed: int, flags: str) -> dict:
        tag = f"{dtype}-seed{seed}"
        shutil.rmtree(self.home / "base_checkpoints" / tag, ignore_errors=True)
        env = {**self.env, "NANOCHAT_DTYPE": dtype, "NANOCHAT_SEED": str(seed)}
        log = self.logs / f"nanochat-{tag}.log"
        args = ["scripts.base_train", *REFERENCE.split(), "--model-tag", tag, *flags.split()]
        process = run_program(args, env, log, cwd=self.source)
        text = log.read_text()
        step_line = r"^step (\d+)/\d+ .*? dt: ([\d.]+)ms \| tok/sec: ([\d,]+)"
        steps = [
            (int(s), float(dt), int(tok.replace(",", ""))) for s, dt, tok in re.findall(step_line, text, re.M)
        ]
        return {
            "tok_per_s": int(statistics.median(tok for step, _, tok in steps if step > 10)),
            "training_min": float(re.search(r"Total training time: ([\d.]+)m", text)[1]),
            "first_step_s": round(steps[0][1] / 1000, 1),
            **process,
            "val_bpb": printed_val_bpb(text),
        }

    def sft(self, model_tag: str, dtype: str, steps: int) -> dict:
        log = self.logs / "nanochat-sft.log"
        args = [
            "scripts.chat_sft", "--model-tag", model_tag, "--load-optimizer", "0",
            "--num-iterations", str(steps), "--eval-every", str(steps), "--eval-tokens", str(SFT_EVAL_TOKENS),
            "--chatcore-every", "-1", "--mmlu-epochs", "0", "--device-type", "cpu",
        ]  # fmt: skip
        process = run_program(args, {**self.env, "NANOCHAT_DTYPE": dtype}, log, cwd=self.source)
        text = log.read_text()
        printed = [float(x) for x in re.findall(r"^step \d+ \(.*? loss: ([\d.]+)", text, re.M)]
        return {
            "loss": [round(x, 4) for x in raw_losses(printed)],
            **process,
            "val_bpb": printed_val_bpb(text),
        }


def recorded_val_bpb(records: list[dict]) -> dict[int, float]:
    """Our metrics.jsonl's val bpb records as {step: bpb}."""
    return {r["step"]: round(r["val_bpb"], 4) for r in records if "val_bpb" in r}


def printed_val_bpb(log_text: str) -> dict[int, float]:
    """The reference's "Step 00100 | Validation bpb: 2.128400" lines as {step: bpb}."""
    found = re.findall(r"Step (\d+) \| Validation bpb: ([\d.]+)", log_text)
    return {int(step): round(float(bpb), 4) for step, bpb in found}


def has_commit(clone: Path | None) -> bool:
    if clone is None:
        return False
    check = ["git", "-C", str(clone), "cat-file", "-e", f"{REFERENCE_COMMIT}^{{commit}}"]
    return subprocess.run(check, capture_output=True).returncode == 0


def print_base_table(results: list[dict]) -> None:
    eval_steps = sorted({step for r in results for step in r["val_bpb"]})
    header = (
        f"{'side':>9} {'dtype':>9} {'seed':>4} {'tok/s':>7} {'train min':>9} {'step 1 s':>8} "
        f"{'process min':>11} {'RSS GB':>6}"
    )
    print(header + "".join(f" {'bpb@' + str(s):>9}" for s in eval_steps))
    for r in results:
        row = (
            f"{r['side']:>9} {r['dtype']:>9} {r['seed']:>4} {r['tok_per_s']:>7,} {r['training_min']:>9.2f} "
            f"{r['first_step_s']:>8.1f} {r['process_min']:>11.2f} {r['peak_rss_gb']:>6.2f}"
        )
        print(row + "".join(f" {r['val_bpb'].get(s, float('nan')):>9.4f}" for s in eval_steps))
    for side in sorted({r["side"] for r in results}):
        for dtype in sorted({r["dtype"] for r in results}):
            finals = [r["val_bpb"][STEPS] for r in results if (r["side"], r["dtype"]) == (side, dtype)]
            if len(finals) > 1:
                mean, spread = statistics.mean(finals), max(finals) - min(finals)
                print(
                    f"{side} {dtype}: final bpb mean {mean:.4f}, spread {spread:.4f} over {len(finals)} seeds"
                )


def print_sft_table(results: list[dict]) -> None:
    steps = min(len(r["loss"]) for r in results)
    shown = sorted({0, 1, 2, 5, 10, 20, steps // 2, steps - 1} & set(range(steps)))
    print("SFT from the same base weights: each step's train loss, val bpb")
    print(f"{'side':>9}" + "".join(f" {'@' + str(s + 1):>7}" for s in shown) + "  val bpb")
    for r in results:
        bpb = " ".join(f"{step}: {value:.4f}" for step, value in sorted(r["val_bpb"].items()))
        print(f"{r['side']:>9}" + "".join(f" {r['loss'][s]:>7.4f}" for s in shown) + f"  {bpb}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sides", nargs="+", choices=["ours", "reference"], default=["ours"])
    parser.add_argument(
        "--nanochat", type=Path, help=f"a git clone of karpathy/nanochat with {REFERENCE_COMMIT}"
    )
    native = cpu_has_bfloat16_matmul()  # else bf16 matmuls run a scalar loop, tens of times slower
    dtypes = ["bfloat16", "float32"] if native else ["float32"]
    parser.add_argument("--dtypes", nargs="+", default=dtypes, help=f"(default here: {' '.join(dtypes)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[42])
    parser.add_argument("--flags", default="", help="extra base_train flags for ours, e.g. a lever")
    parser.add_argument("--sft-steps", type=int, default=0, help="then SFT N steps from the same base")
    parser.add_argument("--base-dir", type=Path, default=None, help="keep runs here (default: a temp dir)")
    args = parser.parse_args()
    needs_reference = "reference" in args.sides or args.sft_steps
    if needs_reference and not has_commit(args.nanochat):
        parser.error(f"--nanochat must name a git clone of karpathy/nanochat holding {REFERENCE_COMMIT}")
    data_dir = Path(os.environ.get("NANOCHAT_DATA_DIR") or ROOT.parent / "shared" / "data").resolve()
    if not (data_dir / "pretrain").is_dir():
        raise SystemExit(f"no data kit at {data_dir}: set NANOCHAT_DATA_DIR to one")
    base = (args.base_dir or Path(tempfile.mkdtemp(prefix="nanochat-bench-"))).resolve()
    base.mkdir(parents=True, exist_ok=True)

    trainers = {"ours": Ours(base, data_dir)}
    if needs_reference:
        trainers["reference"] = Reference(base, data_dir, args.nanochat.resolve())
    results = []
    for side in args.sides:
        for dtype in args.dtypes:
            for seed in args.seeds:
                flags = args.flags if side == "ours" else ""
                figures = trainers[side].base_train(dtype, seed, flags)
                results.append({"side": side, "dtype": dtype, "seed": seed, "flags": flags, **figures})
                print(json.dumps(results[-1]), flush=True)  # each run as it ends: a long bench loses nothing
    sft = []
    if args.sft_steps:
        dtype, tag = args.dtypes[0], f"{args.dtypes[0]}-seed{args.seeds[0]}"
        reference = trainers["reference"]
        if not (reference.home / "base_checkpoints" / tag).is_dir():
            reference.base_train(dtype, args.seeds[0], "")
        sft.append({"side": "reference", **reference.sft(tag, dtype, args.sft_steps)})
        sft.append({"side": "ours", **trainers["ours"].sft(reference.home, tag, dtype, args.sft_steps)})

    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"reference CPU configuration | {machine} | ours: {OURS} {args.flags}".rstrip())
    print(f"nanochat {REFERENCE_COMMIT}: scripts.base_train {REFERENCE} (NANOCHAT_DTYPE, NANOCHAT_SEED)")
    if results:
        print_base_table(results)
    if sft:
        print_sft_table(sft)
    print(f"runs kept in {base}")
    summary = {
        "bench": "reference",
        "machine": machine,
        "commit": REFERENCE_COMMIT,
        "base": results,
        "sft": sft,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
