"""
What continuous batching buys: the model server (`python -m inference`, over HTTP, streaming) at
1/4/16/64 concurrent chat requests, next to the engine's one-request-at-a-time loop on the same model
and prompts (in this process, while the server is idle), and next to the ceiling: the model's bare
decode forward at that batch size (no sampling, no HTTP), which no scheduler can beat.

On a GPU (`--device cuda`, the default where there is one) the server, the serial engine and the bare
forward all run there in bf16; on a CPU in fp32.

Models: random weights (timing depends on the shapes only) of a tiny model (d4, width 256, head dim 64,
context 512) and a d12 (width 768, head dim 128, context 2048), both with a vocab-8,192 tokenizer
trained on the data kit (the recipe's vocab is 32,768: its lm_head is 4× larger than here). Each
request: a distinct prompt of about 32 tokens, greedy, up to 64 new tokens. Prints a table and one
JSON line.

    .venv/bin/python bench/inference.py [--models tiny d12] [--concurrency 1 4 16 64] [--new-tokens 64]
        [--device auto|cpu|cuda]
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import save_file

from trainer import scaling, tok_train
from trainer.chat_format import render_for_completion
from trainer.checkpoint import load_model, step_dir
from trainer.engine import Engine, KVCache
from trainer.gpt import GPT
from trainer.runtime import Runtime, setup_runtime
from trainer.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 8192
MODELS = {
    "tiny": scaling.model_config(4, VOCAB, 512, head_dim=64),
    "d12": scaling.model_config(12, VOCAB, 2048, head_dim=128),
}


def write_random_checkpoint(runs: Path, name: str) -> None:
    torch.manual_seed(0)
    model = GPT(MODELS[name])
    model.init_weights()
    with torch.no_grad():  # zero-initialised projections would make every layer an identity
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = step_dir(runs / name / "sft", 1)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    meta = {"step": 1, "model_config": model.config.to_dict(), "compute_dtype": "float32", "world_size": 1}
    (folder / "meta.json").write_text(json.dumps(meta))


def prompts(count: int) -> list[list[dict]]:
    topics = ["the sea", "bread", "rust", "a violin", "the moon", "taxes", "ants", "glass"]
    return [
        [{"role": "user", "content": f"Question {i}: write a long story about {topics[i % 8]} and {i} cats."}]
        for i in range(count)
    ]


async def one_request(client: httpx.AsyncClient, model: str, messages: list[dict], new_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        # The client shares the CPU with the server, so it parses only the usage chunk and spots text
        # chunks by their bytes (the server writes json.dumps' default separators).
        async for line in response.aiter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                last = time.perf_counter()
                first = first or last
            elif '"usage": {' in line:
                tokens = json.loads(line.removeprefix("data: "))["usage"]["completion_tokens"]
    return {"ttft": first - start, "tokens": tokens, "decode": last - first}


async def concurrent_run(url: str, model: str, concurrency: int, new_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_request(client, model, prompts(1)[0], 4)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_request(client, model, m, new_tokens) for m in prompts(concurrency))
        )
        wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    single = results[0]
    return {
        "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
        "stream_tok_s": (single["tokens"] - 1) / single["decode"] if single["decode"] > 0 else None,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
    }


def load(base: Path, name: str, runtime: Runtime) -> GPT:
    """The model as the server holds it: in the compute dtype, no fp32 master weights."""
    model, _ = load_model(base / "runs" / name / "sft", 1, runtime.device, runtime.dtype)
    return model.to(runtime.dtype).eval()


@torch.inference_mode()
def serial_engine(
    base: Path, name: str, tokenizer: Tokenizer, count: int, new_tokens: int, runtime: Runtime
) -> float:
    """Aggregate tok/s of the engine answering `count` requests one after another."""
    engine = Engine(load(base, name, runtime), tokenizer)
    requests = [render_for_completion(tokenizer, m) for m in prompts(count)]
    engine.complete(requests[0], max_tokens=4, temperature=0)  # warm-up
    start = time.perf_counter()
    tokens = sum(len(engine.complete(p, max_tokens=new_tokens, temperature=0)[0]) for p in requests)
    return tokens / (time.perf_counter() - start)


@torch.inference_mode()
def decode_ceiling(
    base: Path, name: str, batch_size: int, runtime: Runtime, context: int = 96, steps: int = 16
) -> float:
    """tok/s of bare decode forwards over batch_size rows that each hold `context` cached positions."""
    model = load(base, name, runtime)
    cache = KVCache(model, batch_size, context + steps + 2)
    model(torch.zeros(batch_size, context, dtype=torch.long, device=runtime.device), kv_cache=cache)
    fed = torch.zeros(batch_size, 1, dtype=torch.long, device=runtime.device)
    model(fed, kv_cache=cache)  # warm-up
    runtime.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        model(fed, kv_cache=cache)
    runtime.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def start_server(base: Path, port: int, batch: int, runtime: Runtime) -> subprocess.Popen:
    env = {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base),
        "DEV_MODE": "1",
        "INFERENCE_DEVICE": runtime.device.type,
        "INFERENCE_DTYPE": str(runtime.dtype).removeprefix("torch."),
        "INFERENCE_PORT": str(port),
        "INFERENCE_MAX_BATCH_SIZE": str(batch),
        "INFERENCE_MAX_WAITING": str(batch),
    }
    env.pop("API_TOKEN", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "inference"],
        env=env,
        cwd=base,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit("the model server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--serial-requests", type=int, default=8, help="requests in the serial baseline")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    args = parser.parse_args()
    runtime = setup_runtime(args.device)
    data_dir = Path(os.environ.get("NANOCHAT_DATA_DIR") or ROOT.parent / "shared" / "data")
    if not (data_dir / "pretrain").is_dir():
        raise SystemExit(
            f"no data kit at {data_dir}: set NANOCHAT_DATA_DIR to one (the tokenizer trains on it)"
        )
    base = Path(tempfile.mkdtemp(prefix="nanochat-inference-bench-"))
    os.environ.update(NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATA_DIR=str(data_dir))
    tok_train.main(["--run", "bench", "--vocab-size", str(VOCAB), "--max-chars", "20000000"])
    tokenizer = Tokenizer.load(base / "runs" / "bench" / "tokenizer")
    rows = []
    for name in args.models:
        tokenizer.save(base / "runs" / name / "tokenizer")
        write_random_checkpoint(base / "runs", name)
        serial = serial_engine(base, name, tokenizer, args.serial_requests, args.new_tokens, runtime)
        port = 18000 + len(rows)
        server = start_server(base, port, max(args.concurrency), runtime)
        try:
            for concurrency in args.concurrency:
                result = asyncio.run(
                    concurrent_run(f"http://127.0.0.1:{port}", f"{name}-sft", concurrency, args.new_tokens)
                )
                ceiling = decode_ceiling(base, name, concurrency, runtime)
                rows.append(
                    {
                        "model": name,
                        "concurrency": concurrency,
                        "serial_tok_s": serial,
                        "ceiling_tok_s": ceiling,
                        **result,
                    }
                )
        finally:
            server.terminate()
            server.wait()
    if runtime.device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(runtime.device)}, torch {torch.__version__}"
    else:
        machine = f"{platform.machine()} cpu, torch {torch.__version__}, threads {torch.get_num_threads()}"
    dtype = str(runtime.dtype).removeprefix("torch.")
    print(f"inference server | {machine} | {dtype} | ~32-token prompts, greedy, {args.new_tokens} new tokens")
    print(
        f"{'model':>5} {'conc':>5} {'aggregate tok/s':>16} {'serial engine tok/s':>20} {'ratio':>6} "
        f"{'bare forward tok/s':>19} {'its ratio':>10} {'stream tok/s':>13} {'TTFT p50':>9} {'TTFT p99':>9}"
    )
    for r in rows:
        print(
            f"{r['model']:>5} {r['concurrency']:>5} {r['aggregate_tok_s']:>16,.1f} "
            f"{r['serial_tok_s']:>20,.1f} "
            f"{r['aggregate_tok_s'] / r['serial_tok_s']:>5.1f}× {r['ceiling_tok_s']:>19,.1f} "
            f"{r['ceiling_tok_s'] / r['serial_tok_s']:>9.1f}× {r['stream_tok_s'] or 0:>13,.1f} "
            f"{r['ttft_p50']:>8.3f}s {r['ttft_p99']:>8.3f}s"
        )
    print(json.dumps({"bench": "inference", "machine": machine, "dtype": dtype, "results": rows}))


if __name__ == "__main__":
    main()
