"""
Training throughput: tokens/s and MFU of full optimizer steps (forward, backward, Muon+AdamW) on random
tokens, so the model and optimizer are measured without the data pipeline.
  - CPU: depth 2/4/6 (head dim 64, seq 512, vocab 8192), fp32 and bf16, eager and torch.compile'd;
  - CUDA: depth 12 and 20 (head dim 128, seq 2048, vocab 32768), bf16 compiled.
MFU is against the data-sheet peak on a GPU and against this machine's measured matmul peak on a CPU.
Prints a table and one JSON line.

    .venv/bin/python bench/train.py [--depths 2 4 6] [--steps 5]
"""

import argparse
import json
import platform
import time

import torch

from trainer import scaling
from trainer.base_train import build_optimizer
from trainer.base_train import parser as train_parser
from trainer.gpt import GPT
from trainer.runtime import Runtime, autodetect_device, peak_flops


def measure(
    depth: int, device: str, dtype: torch.dtype, compile_model: bool, settings: dict, steps: int
) -> dict:
    config = scaling.model_config(depth, settings["vocab"], settings["seq"], head_dim=settings["head_dim"])
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    model.set_compute_dtype(dtype)
    model.to(device)
    batch = settings["batch"]
    reference = scaling.reference_params(settings["vocab"], settings["seq"], settings["head_dim"])
    horizon = scaling.horizon(scaling.scaling_params(config), reference, 10.5, batch * settings["seq"], 1000)
    optimizer = build_optimizer(model, train_parser.parse_args([]), horizon)
    forward = torch.compile(model, dynamic=False) if compile_model else model
    tokens = torch.randint(0, config.vocab_size, (batch, settings["seq"] + 1), device=device)

    def step() -> None:
        forward(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        model.zero_grad(set_to_none=True)

    runtime = Runtime(torch.device(device), dtype)
    for _ in range(2):  # warm-up (and compilation)
        step()
    runtime.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    runtime.synchronize()
    seconds = (time.perf_counter() - start) / steps
    tok_s = batch * settings["seq"] / seconds
    peak, source = peak_flops(runtime)
    return {
        "depth": depth,
        "width": config.n_embd,
        "dtype": str(dtype).removeprefix("torch."),
        "compiled": compile_model,
        "tok_per_s": round(tok_s),
        "step_s": round(seconds, 3),
        "mfu": round(model.estimate_flops() * tok_s / peak, 4),
        "peak_source": source,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", type=int, nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = autodetect_device()
    if device == "cuda":
        settings = {"vocab": 32768, "seq": 2048, "head_dim": 128, "batch": 16}
        variants = [(d, torch.bfloat16, True) for d in args.depths or (12, 20)]
        machine = torch.cuda.get_device_name()
    else:
        settings = {"vocab": 8192, "seq": 512, "head_dim": 64, "batch": 8}
        variants = [
            (d, dtype, compiled)
            for d in args.depths or (2, 4, 6)
            for dtype in (torch.float32, torch.bfloat16)
            for compiled in (False, True)
        ]
        machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    results = [measure(d, device, dtype, compiled, settings, args.steps) for d, dtype, compiled in variants]
    print(f"training benchmark | {machine} | torch {torch.__version__} | {settings}")
    print(f"{'depth':>5} {'width':>6} {'dtype':>9} {'compiled':>9} {'tok/s':>10} {'step s':>8} {'MFU':>7}")
    for r in results:
        print(
            f"{r['depth']:>5} {r['width']:>6} {r['dtype']:>9} {r['compiled']!s:>9} {r['tok_per_s']:>10,} "
            f"{r['step_s']:>8.3f} {100 * r['mfu']:>6.1f}%"
        )
    print(f"MFU peak: {results[0]['peak_source']}")
    print(json.dumps({"bench": "train", "machine": machine, "settings": settings, "results": results}))


if __name__ == "__main__":
    main()
