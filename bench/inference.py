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
request: a distinct prompt of about 32 tokens, greedy, up to 64 new tokens. Each timed run at a
concurrency follows a warm-up at that concurrency (4 tokens a request, other prompts), as the bare
forward's timing follows a forward at its batch size.

The chat part: what the prefix cache buys a conversation. Conversations of --chat-turns turns, each turn
a ~20-token user message and a greedy reply of up to --chat-reply-tokens, the whole history re-sent
every turn (as a chat UI does), one conversation at a time; the time to first token of the last turn
over that of the first, with the prefix cache (INFERENCE_PREFIX_CACHE_TOKENS at its default) and
without it (0), each the median over --chat-conversations conversations.

The long-prompt part: what chunked prefill buys running streams. 8 greedy streams run; once each has
20 tokens, a prompt of the full context length (less 8 tokens) arrives. Each stream's inter-token
latency (ITL, between text chunks as the client reads them) p99 before it arrived and while it was
prefilled (the gaps that overlap its time to first token), for each INFERENCE_PREFILL_CHUNK_TOKENS in
--prefill-chunks (0: whole prompts).

The memory part: what the paged KV cache buys at a fixed KV budget (--kv-budget-tokens positions,
INFERENCE_KV_CACHE_TOKENS). 64 greedy requests arrive at once, one in eight with a prompt of half the
context, the rest ~32 tokens, no two starting with the same 16 tokens, each up to --new-tokens; the
peak of running streams (sampled from /metrics), preemptions and aggregate tok/s of the paged server,
next to the streams a contiguous batch cache could hold in the same budget. That one is computed, not
run: it is the rule of the cache the server had before (every row reserves the longest row's length,
doubled from 256 up to the context), budget // that length once a long prompt runs. A second run
("shared start") sends 64 requests that each start with the same text of a quarter of the context (a
long system prompt) and end with their own question, after one such request (a server that has served
that start before): with the prefix cache, their streams share its blocks.

The peer part: the same model served by Hugging Face `transformers serve --continuous-batching` (its
paged-attention batching; it needs `pip install accelerate==1.16.0`, not in requirements-dev.txt) and
by ours, the same prompts at --concurrency streams: aggregate tok/s and TTFT p99, and how many of the
greedy replies are the same text. Transformers runs our exports of the architecture its built-in
NanoChat class computes (full windows, no value embeddings, smear, backout or layer scalars, QK scale
1), so these models have it: random weights larger than the others' (clear-cut greedy choices) whose
special tokens are never the likeliest, so both servers write every requested token. Both get the
whole machine, one at a time.

--cuda-graphs serves with the decode steps replayed as CUDA graphs (INFERENCE_CUDA_GRAPHS, GPU only);
bench/gpu_check.sh runs the throughput part with and without.

Prints a table per part and one JSON line.

    .venv/bin/python bench/inference.py [--models tiny d12]
        [--parts throughput (default) chat long-prompt memory peer] [--concurrency 1 4 16 64]
        [--new-tokens 64] [--chat-turns 10] [--prefill-chunks 0 64 256] [--kv-budget-tokens 4096]
        [--device auto|cpu|cuda] [--cuda-graphs]
"""

import argparse
import asyncio
import itertools
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

from trainer import export, scaling, tok_train
from trainer.chat_format import render_for_completion
from trainer.checkpoint import load_model, step_dir
from trainer.engine import Engine, KVCache
from trainer.gpt import GPT, GPTConfig
from trainer.runtime import Runtime, setup_runtime
from trainer.tokenizer import SPECIAL_TOKENS, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 8192
MODELS = {
    "tiny": scaling.model_config(4, VOCAB, 512, head_dim=64),
    "d12": scaling.model_config(12, VOCAB, 2048, head_dim=128),
}


def write_random_checkpoint(
    runs: Path, name: str, config: GPTConfig | None = None, scale: float = 0.02
) -> None:
    torch.manual_seed(0)
    model = GPT(config or MODELS[name])
    model.init_weights()
    with torch.no_grad():  # zero-initialised projections would make every layer an identity
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
        if config is not None:  # the peer's model: special tokens' logits 0, below the likeliest token's
            model.lm_head.weight[VOCAB - len(SPECIAL_TOKENS) :] = 0
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


def warm_up_prompts(concurrency: int) -> list[list[dict]]:
    """A warm-up request per stream at the timed concurrency, as the bare forward warms up at its batch
    size (a server's first batch of a size pays one-off costs: the KV pool's first touches, the
    allocator's growth), with other prompts than the timed ones (the prefix cache holds none of theirs)."""
    return prompts(2 * concurrency)[concurrency:]


async def one_request(
    client: httpx.AsyncClient, model: str, messages: list[dict], new_tokens: int, keep_text: bool = False
) -> dict:
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
    tokens = prompt_tokens = 0
    text = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        # The client shares the CPU with the server, so it parses only the usage chunk and spots text
        # chunks by their bytes (the server writes json.dumps' default separators).
        async for line in response.aiter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                last = time.perf_counter()
                first = first or last
                if keep_text:
                    text.append(json.loads(line.removeprefix("data: "))["choices"][0]["delta"]["content"])
            elif '"usage": {' in line:
                usage = json.loads(line.removeprefix("data: "))["usage"]
                tokens, prompt_tokens = usage["completion_tokens"], usage["prompt_tokens"]
    return {
        "ttft": first - start,
        "tokens": tokens,
        "decode": last - first,
        "prompt_tokens": prompt_tokens,
        "text": "".join(text),
    }


async def concurrent_run(url: str, model: str, concurrency: int, new_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(one_request(client, model, m, 4) for m in warm_up_prompts(concurrency)))
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_request(client, model, m, new_tokens) for m in prompts(concurrency))
        )
        wall = time.perf_counter() - start
    ttfts = [r["ttft"] for r in results]
    single = results[0]
    return {
        "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
        "stream_tok_s": (single["tokens"] - 1) / single["decode"] if single["decode"] > 0 else None,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p99": p99(ttfts),
    }


async def conversation(url: str, model: str, turns: int, reply_tokens: int, number: int) -> list[dict]:
    """One greedy chat, the whole history sent every turn: each turn's TTFT and prompt length."""
    messages, turn_results = [], []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for turn in range(turns):
            topic = ["the sea", "bread", "rust", "a violin", "the moon", "taxes", "ants", "glass"][turn % 8]
            content = f"Chat {number}, turn {turn}: and what did the {topic} do after that, in detail?"
            messages.append({"role": "user", "content": content})
            result = await one_request(client, model, messages, reply_tokens, keep_text=True)
            messages.append({"role": "assistant", "content": result["text"]})
            turn_results.append({"ttft": result["ttft"], "prompt_tokens": result["prompt_tokens"]})
    return turn_results


def chat_run(url: str, model: str, turns: int, reply_tokens: int, count: int) -> dict:
    """Median TTFT of the first and the last turn over `count` conversations (after one warm-up)."""
    asyncio.run(conversation(url, model, 2, 4, number=-1))
    chats = [asyncio.run(conversation(url, model, turns, reply_tokens, number)) for number in range(count)]
    return {
        "first_turn_ttft": statistics.median(c[0]["ttft"] for c in chats),
        "last_turn_ttft": statistics.median(c[-1]["ttft"] for c in chats),
        "first_turn_prompt_tokens": statistics.median(c[0]["prompt_tokens"] for c in chats),
        "last_turn_prompt_tokens": statistics.median(c[-1]["prompt_tokens"] for c in chats),
    }


async def timed_stream(client: httpx.AsyncClient, body: dict, times: list[float]) -> None:
    """Stream a chat request, appending the arrival time of each text chunk to `times`."""
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                times.append(time.perf_counter())


def p99(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]


async def streams_beside_long_prompt(url: str, model: str, long_text: str, streams: int = 8) -> dict:
    """ITL p99 of `streams` running streams before and while a long prompt is prefilled."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await one_request(client, model, prompts(1)[0], 4)  # warm-up
        arrivals: list[list[float]] = [[] for _ in range(streams)]
        body = {"model": model, "max_tokens": 10_000, "temperature": 0}  # capped at the context
        tasks = [
            asyncio.create_task(timed_stream(client, {**body, "messages": m}, times))
            for m, times in zip(prompts(streams), arrivals, strict=True)
        ]
        while min(len(times) for times in arrivals) < 20:
            await asyncio.sleep(0.005)
        sent = time.perf_counter()
        long = await one_request(client, model, [{"role": "user", "content": long_text}], 1)
        prefilled = sent + long["ttft"]
        counts = [len(times) for times in arrivals]
        while any(len(t) < c + 5 for t, c in zip(arrivals, counts, strict=True)):
            await asyncio.sleep(0.005)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    gaps = [(b - a, a, b) for times in arrivals for a, b in itertools.pairwise(times[4:])]
    before = [gap for gap, _, end in gaps if end < sent]
    during = [gap for gap, start, end in gaps if end > sent and start < prefilled]
    return {
        "long_prompt_tokens": long["prompt_tokens"],
        "long_prompt_ttft": long["ttft"],
        "itl_p99_before": p99(before),
        "itl_p99_during": p99(during),
    }


def long_text(tokenizer: Tokenizer, tokens: int) -> str:
    """Text that a chat prompt turns into about `tokens` tokens."""
    words = " ".join(f"word{i} about the {['sea', 'moon', 'glass'][i % 3]}" for i in range(tokens))
    return tokenizer.decode(tokenizer.encode(words)[: tokens - 8])


async def peak_streams(
    url: str, model: str, requests: list[list[dict]], new_tokens: int, served_before: list[list[dict]]
) -> dict:
    """Send the requests served_before one after the other, then every request at once: the peak of
    running sequences the server reported while these ran."""
    peak, done = 0, asyncio.Event()

    async def watch(client: httpx.AsyncClient) -> None:
        nonlocal peak
        while not done.is_set():
            for line in (await client.get("/metrics")).text.splitlines():
                if line.startswith("inference_running_sequences{"):
                    peak = max(peak, int(float(line.split()[-1])))
            await asyncio.sleep(0.05)

    async with httpx.AsyncClient(base_url=url, timeout=1200) as client:
        for messages in served_before:
            await one_request(client, model, messages, new_tokens)
        watcher = asyncio.create_task(watch(client))
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, model, m, new_tokens) for m in requests))
        wall = time.perf_counter() - start
        done.set()
        await watcher
        preemptions = sum(
            float(line.split()[-1])
            for line in (await client.get("/metrics")).text.splitlines()
            if line.startswith("inference_preemptions_total")
        )
    return {
        "peak_streams": peak,
        "preemptions": preemptions,
        "aggregate_tok_s": sum(r["tokens"] for r in results) / wall,
        "longest_prompt_tokens": max(r["prompt_tokens"] for r in results),
    }


def contiguous_streams(budget: int, longest_row: int, context: int) -> int:
    """Rows a contiguous batch cache of `budget` positions holds once its longest row is `longest_row`:
    every row reserves the same length, doubled from 256 as rows grow, up to the context."""
    reserved = min(256, context)
    while reserved < longest_row:
        reserved = min(2 * reserved, context)
    return budget // reserved


async def plain_request(client: httpx.AsyncClient, model: str, messages: list[dict], new_tokens: int) -> dict:
    """A greedy streamed chat request read by any OpenAI-compatible server: every data line parsed."""
    body = {"model": model, "messages": messages, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    start, first, text = time.perf_counter(), None, []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line.removeprefix("data: "))["choices"]
            if choices and (content := choices[0]["delta"].get("content")):
                first = first or time.perf_counter()
                text.append(content)
    return {"ttft": first - start, "text": "".join(text)}


async def peer_run(url: str, model: str, concurrency: int, new_tokens: int, tokenizer: Tokenizer) -> dict:
    """Aggregate tok/s (tokens counted by re-encoding the replies) and TTFT p99 at `concurrency`."""
    async with httpx.AsyncClient(base_url=url, timeout=1200) as client:
        await asyncio.gather(*(plain_request(client, model, m, 4) for m in warm_up_prompts(concurrency)))
        start = time.perf_counter()
        results = await asyncio.gather(
            *(plain_request(client, model, m, new_tokens) for m in prompts(concurrency))
        )
        wall = time.perf_counter() - start
    tokens = sum(len(tokenizer.encode(r["text"])) for r in results)
    return {
        "aggregate_tok_s": tokens / wall,
        "ttft_p99": p99([r["ttft"] for r in results]),
        "texts": [r["text"] for r in results],
    }


def start_peer(folder: Path, port: int, runtime: Runtime) -> subprocess.Popen:
    """`transformers serve` with continuous batching on the export folder."""
    command = [
        str(Path(sys.executable).with_name("transformers")), "serve", str(folder), "--continuous-batching",
        "--device", runtime.device.type, "--dtype", str(runtime.dtype).removeprefix("torch."),
        "--port", str(port), "--host", "127.0.0.1", "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # a local folder: nothing to fetch
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return wait_ready(
        server, f"http://127.0.0.1:{port}/v1/models", 300, "transformers serve (is accelerate installed?)"
    )


def wait_ready(server: subprocess.Popen, url: str, seconds: float, name: str) -> subprocess.Popen:
    """The server, once `url` answers 200; SystemExit naming it if it exits or is not ready in time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"{name} exited ({server.returncode})")
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"{name} did not become ready in {seconds:.0f} s")


def peer_rows(
    base: Path, name: str, tokenizer: Tokenizer, args: argparse.Namespace, runtime: Runtime
) -> list[dict]:
    """Our server and transformers serve on the same export, one after the other."""
    peer_name = f"{name}-builtin"
    config = GPTConfig(**{**MODELS[name].to_dict(), **export.BUILTIN_ARCHITECTURE})
    tokenizer.save(base / "runs" / peer_name / "tokenizer")
    write_random_checkpoint(base / "runs", peer_name, config, scale=0.3)
    folder = base / "exports" / peer_name
    assert export.main(["--run", peer_name, "--stage", "sft", "--out", str(folder)])["architecture"] == (
        "NanoChatForCausalLM"
    )
    figures: dict[str, dict[int, dict]] = {}
    for server_name in ("ours", "transformers serve"):
        port = 18400
        if server_name == "ours":
            server = start_server(base, port, max(args.concurrency), runtime)
        else:
            server = start_peer(folder, port, runtime)
        model = f"{peer_name}-sft" if server_name == "ours" else str(folder)
        try:
            figures[server_name] = {
                c: asyncio.run(peer_run(f"http://127.0.0.1:{port}", model, c, args.new_tokens, tokenizer))
                for c in args.concurrency
            }
        finally:
            server.terminate()
            server.wait()
    rows = []
    for concurrency in args.concurrency:
        ours, peer = figures["ours"][concurrency], figures["transformers serve"][concurrency]
        same = sum(a == b for a, b in zip(ours.pop("texts"), peer.pop("texts"), strict=True))
        rows.append(
            {
                "model": name,
                "concurrency": concurrency,
                "ours_tok_s": ours["aggregate_tok_s"],
                "peer_tok_s": peer["aggregate_tok_s"],
                "ours_ttft_p99": ours["ttft_p99"],
                "peer_ttft_p99": peer["ttft_p99"],
                "same_greedy_text": f"{same}/{concurrency}",
            }
        )
    return rows


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


def start_server(
    base: Path, port: int, batch: int, runtime: Runtime, settings: dict[str, str] | None = None
) -> subprocess.Popen:
    env = {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base),
        "DEV_MODE": "1",
        "INFERENCE_DEVICE": runtime.device.type,
        "INFERENCE_DTYPE": str(runtime.dtype).removeprefix("torch."),
        "INFERENCE_PORT": str(port),
        "INFERENCE_MAX_BATCH_SIZE": str(batch),
        "INFERENCE_MAX_WAITING": str(batch),
        **(settings or {}),
    }
    env.pop("API_TOKEN", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "inference"],
        env=env,
        cwd=base,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    return wait_ready(server, f"http://127.0.0.1:{port}/ready", 120, "the model server")


def throughput_rows(
    base: Path, name: str, tokenizer: Tokenizer, args: argparse.Namespace, runtime: Runtime
) -> list[dict]:
    serial = serial_engine(base, name, tokenizer, args.serial_requests, args.new_tokens, runtime)
    port = 18000
    server = start_server(base, port, max(args.concurrency), runtime)
    rows = []
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
    return rows


def chat_rows(base: Path, name: str, args: argparse.Namespace, runtime: Runtime) -> list[dict]:
    """The chat part with the prefix cache at its default size, then without it."""
    rows = []
    for prefix_cache, setting in (("on", {}), ("off", {"INFERENCE_PREFIX_CACHE_TOKENS": "0"})):
        port = 18100
        server = start_server(base, port, 4, runtime, setting)
        try:
            result = chat_run(
                f"http://127.0.0.1:{port}",
                f"{name}-sft",
                args.chat_turns,
                args.chat_reply_tokens,
                args.chat_conversations,
            )
        finally:
            server.terminate()
            server.wait()
        rows.append({"model": name, "prefix_cache": prefix_cache, **result})
    return rows


def long_prompt_rows(
    base: Path, name: str, tokenizer: Tokenizer, args: argparse.Namespace, runtime: Runtime
) -> list[dict]:
    text = long_text(tokenizer, MODELS[name].sequence_len - 8)
    rows = []
    for chunk in args.prefill_chunks:
        port = 18200
        server = start_server(base, port, 16, runtime, {"INFERENCE_PREFILL_CHUNK_TOKENS": str(chunk)})
        try:
            result = asyncio.run(streams_beside_long_prompt(f"http://127.0.0.1:{port}", f"{name}-sft", text))
        finally:
            server.terminate()
            server.wait()
        rows.append({"model": name, "prefill_chunk": chunk, **result})
    return rows


def memory_rows(
    base: Path, name: str, tokenizer: Tokenizer, args: argparse.Namespace, runtime: Runtime
) -> list[dict]:
    context = MODELS[name].sequence_len
    long_message = long_text(tokenizer, context // 2)
    distinct = [  # the long ones start apart: no two requests share a whole block
        [{"role": "user", "content": f"Story {i}: {long_message}"}] if i % 8 == 0 else messages
        for i, messages in enumerate(prompts(64))
    ]
    shared = long_text(tokenizer, context // 4)
    shared_start = [[{"role": "user", "content": f"{shared}\n\n{m[0]['content']}"}] for m in prompts(65)]
    rows = []
    runs = [("distinct", distinct, []), ("shared start", shared_start[1:], shared_start[:1])]
    for kind, requests, served_before in runs:
        port = 18300
        settings = {"INFERENCE_KV_CACHE_TOKENS": str(args.kv_budget_tokens), "INFERENCE_MAX_WAITING": "64"}
        server = start_server(base, port, 64, runtime, settings)
        try:
            url = f"http://127.0.0.1:{port}"
            result = asyncio.run(peak_streams(url, f"{name}-sft", requests, args.new_tokens, served_before))
        finally:
            server.terminate()
            server.wait()
        longest_row = result["longest_prompt_tokens"] + args.new_tokens
        contiguous = contiguous_streams(args.kv_budget_tokens, longest_row, context)
        rows.append(
            {
                "model": name,
                "prompts": kind,
                "kv_budget_tokens": args.kv_budget_tokens,
                "contiguous_streams": contiguous,
                **result,
            }
        )
    return rows


def print_throughput(rows: list[dict]) -> None:
    print(
        f"{'model':>5} {'conc':>5} {'aggregate tok/s':>16} {'serial engine tok/s':>20} {'ratio':>6} "
        f"{'bare forward tok/s':>19} {'its ratio':>10} {'share of it':>12} {'stream tok/s':>13} "
        f"{'TTFT p50':>9} {'TTFT p99':>9}"
    )
    for r in rows:
        print(
            f"{r['model']:>5} {r['concurrency']:>5} {r['aggregate_tok_s']:>16,.1f} "
            f"{r['serial_tok_s']:>20,.1f} "
            f"{r['aggregate_tok_s'] / r['serial_tok_s']:>5.1f}× {r['ceiling_tok_s']:>19,.1f} "
            f"{r['ceiling_tok_s'] / r['serial_tok_s']:>9.1f}× "
            f"{r['aggregate_tok_s'] / r['ceiling_tok_s']:>12.0%} "
            f"{r['stream_tok_s'] or 0:>13,.1f} "
            f"{r['ttft_p50']:>8.3f}s {r['ttft_p99']:>8.3f}s"
        )


def print_chat(rows: list[dict], turns: int) -> None:
    print(
        f"{'model':>5} {'prefix cache':>12} {'turn 1 prompt':>14} {'turn 1 TTFT':>12} "
        f"{f'turn {turns} prompt':>15} {f'turn {turns} TTFT':>13} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['model']:>5} {r['prefix_cache']:>12} {r['first_turn_prompt_tokens']:>14.0f} "
            f"{r['first_turn_ttft']:>11.4f}s {r['last_turn_prompt_tokens']:>15.0f} "
            f"{r['last_turn_ttft']:>12.4f}s {r['last_turn_ttft'] / r['first_turn_ttft']:>5.2f}×"
        )


def print_long_prompt(rows: list[dict]) -> None:
    print(
        f"{'model':>5} {'chunk':>6} {'long prompt':>12} {'its TTFT':>9} {'ITL p99 before':>15} "
        f"{'ITL p99 during':>15} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['model']:>5} {r['prefill_chunk'] or 'whole':>6} {r['long_prompt_tokens']:>12} "
            f"{r['long_prompt_ttft']:>8.3f}s {r['itl_p99_before'] * 1000:>12.1f} ms "
            f"{r['itl_p99_during'] * 1000:>12.1f} ms {r['itl_p99_during'] / r['itl_p99_before']:>5.1f}×"
        )


def print_memory(rows: list[dict]) -> None:
    print(
        f"{'model':>5} {'prompts':>12} {'KV budget':>10} {'longest prompt':>15} {'contiguous streams':>19} "
        f"{'paged peak streams':>19} {'ratio':>6} {'preemptions':>12} {'paged tok/s':>12}"
    )
    for r in rows:
        print(
            f"{r['model']:>5} {r['prompts']:>12} {r['kv_budget_tokens']:>10,} "
            f"{r['longest_prompt_tokens']:>15} "
            f"{r['contiguous_streams']:>19} {r['peak_streams']:>19} "
            f"{r['peak_streams'] / max(r['contiguous_streams'], 1):>5.1f}× {r['preemptions']:>12.0f} "
            f"{r['aggregate_tok_s']:>12,.1f}"
        )


def print_peer(rows: list[dict]) -> None:
    print(
        f"{'model':>5} {'conc':>5} {'ours tok/s':>11} {'peer tok/s':>11} {'ratio':>6} "
        f"{'ours TTFT p99':>14} {'peer TTFT p99':>14} {'same greedy text':>17}"
    )
    for r in rows:
        print(
            f"{r['model']:>5} {r['concurrency']:>5} {r['ours_tok_s']:>11,.1f} {r['peer_tok_s']:>11,.1f} "
            f"{r['ours_tok_s'] / r['peer_tok_s']:>5.2f}× {r['ours_ttft_p99']:>13.3f}s "
            f"{r['peer_ttft_p99']:>13.3f}s {r['same_greedy_text']:>17}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parts = ["throughput", "chat", "long-prompt", "memory", "peer"]
    parser.add_argument("--parts", nargs="+", choices=parts, default=["throughput"], help=f"of {parts}")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--serial-requests", type=int, default=8, help="requests in the serial baseline")
    parser.add_argument("--chat-turns", type=int, default=10, help="turns of each chat (the last is timed)")
    parser.add_argument("--chat-reply-tokens", type=int, default=24, help="longest reply of a chat turn")
    parser.add_argument("--chat-conversations", type=int, default=3, help="chats per setting (medians)")
    parser.add_argument(
        "--prefill-chunks", type=int, nargs="+", default=[0, 64, 256], help="chunk sizes (0: whole prompts)"
    )
    parser.add_argument(
        "--kv-budget-tokens", type=int, default=4096, help="KV positions of the memory part's server"
    )
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu or cuda")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="every server with INFERENCE_CUDA_GRAPHS=true (GPU only)"
    )
    args = parser.parse_args()
    runtime = setup_runtime(args.device)
    if args.cuda_graphs:
        os.environ["INFERENCE_CUDA_GRAPHS"] = "true"  # what start_server passes on to every server
    data_dir = Path(os.environ.get("NANOCHAT_DATA_DIR") or ROOT.parent / "shared" / "data")
    if not (data_dir / "pretrain").is_dir():
        raise SystemExit(
            f"no data kit at {data_dir}: set NANOCHAT_DATA_DIR to one (the tokenizer trains on it)"
        )
    base = Path(tempfile.mkdtemp(prefix="nanochat-inference-bench-"))
    os.environ.update(NANOCHAT_BASE_DIR=str(base), NANOCHAT_DATA_DIR=str(data_dir))
    tok_train.main(["--run", "bench", "--vocab-size", str(VOCAB), "--max-chars", "20000000"])
    tokenizer = Tokenizer.load(base / "runs" / "bench" / "tokenizer")
    rows, chats, long_prompts, memory, peers = [], [], [], [], []
    for name in args.models:
        tokenizer.save(base / "runs" / name / "tokenizer")
        write_random_checkpoint(base / "runs", name)
        if "throughput" in args.parts:
            rows += throughput_rows(base, name, tokenizer, args, runtime)
        if "chat" in args.parts:
            chats += chat_rows(base, name, args, runtime)
        if "long-prompt" in args.parts:
            long_prompts += long_prompt_rows(base, name, tokenizer, args, runtime)
        if "memory" in args.parts:
            memory += memory_rows(base, name, tokenizer, args, runtime)
        if "peer" in args.parts:
            peers += peer_rows(base, name, tokenizer, args, runtime)
    if runtime.device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(runtime.device)}, torch {torch.__version__}"
    else:
        machine = f"{platform.machine()} cpu, torch {torch.__version__}, threads {torch.get_num_threads()}"
    dtype = str(runtime.dtype).removeprefix("torch.")
    if args.cuda_graphs:
        dtype += ", CUDA graphs" if runtime.device.type == "cuda" else ", CUDA graphs (ignored: no GPU)"
    if rows:
        print(
            f"inference server | {machine} | {dtype} | ~32-token prompts, greedy, "
            f"{args.new_tokens} new tokens"
        )
        print_throughput(rows)
    if chats:
        print(
            f"chat turns | {machine} | {dtype} | {args.chat_turns} turns, replies ≤ {args.chat_reply_tokens} "
            f"tokens, median of {args.chat_conversations} chats"
        )
        print_chat(chats, args.chat_turns)
    if long_prompts:
        print(f"8 streams beside a full-context prompt | {machine} | {dtype}")
        print_long_prompt(long_prompts)
    if memory:
        print(
            f"64 requests at a fixed KV budget, 1 in 8 with a half-context prompt | {machine} | {dtype} | "
            f"{args.new_tokens} new tokens"
        )
        print_memory(memory)
    if peers:
        import transformers  # only the peer part needs it

        print(
            f"side by side with transformers {transformers.__version__} serve --continuous-batching | "
            f"{machine} | {dtype} | built-in NanoChat architecture, greedy, {args.new_tokens} new tokens"
        )
        print_peer(peers)
    figures = {"results": rows, "chat": chats, "long_prompt": long_prompts, "memory": memory, "peer": peers}
    print(json.dumps({"bench": "inference", "machine": machine, "dtype": dtype, **figures}))


if __name__ == "__main__":
    main()
