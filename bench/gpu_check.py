"""
The GPU check: what the CPU machines this project is built on cannot measure or prove, in one run on an
NVIDIA machine (under 10 minutes on one H100/H200). bench/gpu_check.sh sets up the Python environment
and runs this; each part is a subprocess with its own time limit, and one that fails does not stop the
others.

  gpu-tests   pytest -m gpu: the tests that need a CUDA GPU (flash attention against a naive reference,
              float8 GEMMs in cuBLAS's layouts)
  d12, d20    base_train through the real program (data pipeline, checkpoint, eval included): bf16,
              torch.compile'd, on the attention path the machine offers; tok/s, MFU, peak memory
  fp8         d20 again with --fp8 (float8 matmuls, compute capability ≥ 8.9): its tok/s and MFU
              against d20's bf16 row
  fp16        base_train d12 in fp16 with the grad scaler: the loss stays finite
  torchrun    base_train in 2 processes: NCCL across 2 GPUs, or, with one GPU, gloo on the CPU (NCCL
              then stays unchecked, and the result says so)
  inference   bench/inference.py on the GPU: the model server against the engine and the bare forward,
              chat turns (prefix cache), a long prompt (chunked prefill), a fixed KV budget (paged)
  inference-graphs  the server's throughput again with INFERENCE_CUDA_GRAPHS=true, next to the part
              above's (tests/inference/test_decode_graphs.py in gpu-tests checks the replies)

Prints one line per part and one JSON line at the end. `--smoke` runs every part tiny on the CPU: what
the test suite does to keep this script working on machines without a GPU.

    python bench/gpu_check.py [--smoke] [--data DIR] [--out DIR] [--parts PART ...]
"""

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent

# Each base_train run: its flags and time limit (s). Batches are smaller than the recipe's so that a step
# takes seconds; MFU does not depend on the number of accumulation steps.
FULL = {
    "vocab": 32768,
    "train": "--max-seq-len 2048 --device-batch-size 32 --eval-tokens 1048576 --core-metric-every -1",
    "runs": {
        "d12": ("--depth 12 --total-batch-size 524288 --num-iterations 16", 240),
        "d20": ("--depth 20 --total-batch-size 262144 --num-iterations 14", 300),
        "fp8": ("--depth 20 --total-batch-size 262144 --num-iterations 14 --fp8", 300),
        "fp16": ("--depth 12 --total-batch-size 262144 --num-iterations 10 --dtype float16", 240),
    },
    "torchrun": "--depth 4 --max-seq-len 1024 --device-batch-size 8 --total-batch-size 32768 "
    "--num-iterations 6 --eval-tokens 65536 --core-metric-every -1",
    "inference": "--models tiny d12 --concurrency 1 16 64 --parts throughput chat long-prompt memory",
    "inference-graphs": "--models tiny d12 --concurrency 1 16 64 --parts throughput --cuda-graphs",
}
PARTS = ["gpu-tests", "d12", "d20", "fp8", "fp16", "torchrun", "inference", "inference-graphs"]
SMOKE = {  # only the first run compiles: on a CPU, compiling costs half a minute a run
    "vocab": 2048,
    "train": "--head-dim 64 --max-seq-len 128 --device-batch-size 4 --eval-tokens 4096 "
    "--core-metric-every -1",
    "runs": {
        "d12": ("--depth 2 --total-batch-size 1024 --num-iterations 3 --compile", 300),
        "d20": ("--depth 2 --total-batch-size 1024 --num-iterations 3", 300),
        "fp8": ("--depth 2 --total-batch-size 1024 --num-iterations 3 --fp8", 300),
        "fp16": ("--depth 2 --total-batch-size 1024 --num-iterations 3 --dtype float16", 300),
    },
    "torchrun": "--depth 2 --head-dim 64 --max-seq-len 128 --device-batch-size 2 --total-batch-size 1024 "
    "--num-iterations 3 --eval-tokens 4096 --core-metric-every -1",
    "inference": "--models tiny --concurrency 1 2 --new-tokens 8 --serial-requests 2",
    "inference-graphs": "--models tiny --concurrency 2 --new-tokens 8 --serial-requests 2 --cuda-graphs",
}


def run_part(
    name: str, command: list[str], env: dict[str, str], timeout: int, logs: Path
) -> tuple[bool, str]:
    """Run one part; its whole output goes to <logs>/<name>.log. Returns (exited 0, output)."""
    started = time.monotonic()
    # Its own process group, so that a time limit also stops what it started (torchrun's processes).
    part = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = part.communicate(timeout=timeout)
        ok = part.returncode == 0
    except subprocess.TimeoutExpired:
        os.killpg(part.pid, signal.SIGKILL)
        output, _ = part.communicate()
        ok, output = False, f"{output}\n(timed out after {timeout} s)"
    (logs / f"{name}.log").write_text(output)
    print(f"[{name}] {'ok' if ok else 'FAILED'} in {time.monotonic() - started:.0f}s", flush=True)
    return ok, output


def json_after(output: str, marker: str) -> dict | None:
    """The JSON object on the last line of `output` that has `marker`, from the first { at or after it."""
    lines = [line[line.index(marker) :] for line in output.splitlines() if marker in line]
    return json.loads(lines[-1][lines[-1].index("{") :]) if lines else None


def failure(output: str) -> dict:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return {"ok": False, "error": lines[-1][:300] if lines else "(no output)"}


def base_train(
    run: str, flags: str, env: dict[str, str], timeout: int, logs: Path, launcher: list[str]
) -> dict:
    """One base_train run's figures, from its summary line; not ok when it failed or a loss was not finite."""
    separator = ["--"] if "torch.distributed.run" in launcher else []
    command = [*launcher, "-m", "trainer.base_train", *separator, "--run", run, *flags.split()]
    ok, output = run_part(run, command, env, timeout, logs)
    summary = json_after(output, "base_train done: ")
    if not ok or summary is None:
        return failure(output)
    losses = [float(loss) for loss in re.findall(r"\| loss (\S+) \|", output)]
    keys = ("depth", "dtype", "fp8", "attention", "tok_per_s", "mfu", "peak_memory_gib", "val_bpb", "device")
    return {"ok": bool(losses) and all(map(math.isfinite, losses)), **{k: summary.get(k) for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="every part tiny, on the CPU")
    parser.add_argument("--data", type=Path, default=None, help="a data kit (default: NANOCHAT_DATA_DIR)")
    parser.add_argument("--out", type=Path, default=None, help="where each part's log goes (default: temp)")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        default=PARTS,
        help="the parts to run (default: all), e.g. to rerun one",
    )
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    data = args.data or Path(os.environ.get("NANOCHAT_DATA_DIR") or ROOT.parent / "shared" / "data")
    if not (data / "pretrain").is_dir():
        sys.exit(f"gpu_check: no data kit at {data} (pass --data, or set NANOCHAT_DATA_DIR)")
    gpus = torch.cuda.device_count()
    if gpus == 0 and not args.smoke:
        sys.exit("gpu_check: torch sees no CUDA GPU here; --smoke runs every part tiny on the CPU")
    base = Path(tempfile.mkdtemp(prefix="nanochat-gpu-check-"))
    logs = args.out or base / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), "NANOCHAT_DATA_DIR": str(data.resolve())}
    python, on_cpu = [sys.executable], " --device cpu" if args.smoke else ""
    results: dict[str, dict] = {}

    tests = (
        "-m pytest -m gpu -q -p no:cacheprovider tests/trainer/test_attention.py tests/trainer/test_fp8.py "
        "tests/inference/test_decode_graphs.py"
    )
    if "gpu-tests" in args.parts:
        ok, output = run_part("gpu-tests", [*python, *tests.split()], env, 300, logs)
        counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", output)}
        results["gpu-tests"] = {"ok": ok, **counts}

    training = [run for run in (*sizes["runs"], "torchrun") if run in args.parts]
    tokenizer = f"-m trainer.tok_train --run tok --vocab-size {sizes['vocab']} --max-chars 20000000"
    ok, output = (
        run_part("tokenizer", [*python, *tokenizer.split()], env, 300, logs) if training else (True, "")
    )
    if not ok:
        results["tokenizer"] = failure(output)
    else:
        for run in training:
            shutil.copytree(base / "runs" / "tok" / "tokenizer", base / "runs" / run / "tokenizer")
        for run, (flags, timeout) in sizes["runs"].items():
            if run in training:
                results[run] = base_train(
                    run, f"{sizes['train']} {flags}{on_cpu}", env, timeout, logs, python
                )
        if "torchrun" in training:
            nccl = gpus >= 2 and not args.smoke
            launcher = [*python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
            flags = sizes["torchrun"] + ("" if nccl else " --device cpu")
            results["torchrun"] = {
                "backend": "nccl" if nccl else "gloo on the CPU (fewer than 2 GPUs: NCCL not checked)",
                **base_train("torchrun", flags, env, 300, logs, launcher),
            }

    device = "cpu" if args.smoke else "cuda"
    for name, timeout, parts in (
        ("inference", 600, ("results", "chat", "long_prompt", "memory")),
        ("inference-graphs", 300, ("results",)),
    ):
        if name not in args.parts:
            continue
        ok, output = run_part(name, [*python, "bench/inference.py", *sizes[name].split(),
                                     "--device", device], env, timeout, logs)  # fmt: skip
        figures = json_after(output, '{"bench": "inference"') if ok else None
        results[name] = {"ok": True, **{p: figures[p] for p in parts}} if figures else failure(output)

    machine = torch.cuda.get_device_name(0) if gpus else f"{platform.machine()} CPU"
    print(f"\ngpu check | {machine} | torch {torch.__version__} (CUDA {torch.version.cuda}) | logs: {logs}")
    for name, result in results.items():
        shown = {k: v for k, v in result.items() if k not in ("ok", "results")}
        print(f"  {name:<16} {'ok' if result['ok'] else 'FAILED':<7} {shown}")
    summary = {
        "bench": "gpu_check",
        "machine": machine,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "smoke": args.smoke,
        "ok": all(result["ok"] for result in results.values()),
        "parts": results,
    }
    print(json.dumps(summary))
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    main()
