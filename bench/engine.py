"""
Decode speed of the engine (KV cache: one prefill, then one position per token) against the plain loop
without a cache (a full forward pass over the whole sequence for every new token), at batch 1 and 8,
for random-weight d4 and d12 models (vocab 32,768, head dim 128 as the recipe; on a CPU the d4 uses head
dim 64). Greedy decoding, so both loops must produce the same tokens (checked). Prints a table and one
JSON line.

    .venv/bin/python bench/engine.py [--depths 4 12] [--batches 1 8] [--prompt 64] [--new-tokens 64]
"""

import argparse
import json
import platform
import time

import torch

from trainer import scaling
from trainer.engine import Engine
from trainer.gpt import GPT
from trainer.runtime import autodetect_device, resolve_dtype
from trainer.tokenizer import Tokenizer

VOCAB = 32768


class RandomTokenizer(Tokenizer):
    """Just the special-token ids the engine looks up; a random model's text is never decoded here."""

    def __init__(self, vocab_size: int) -> None:
        names = ["<|bos|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>"]
        names += ["<|output_start|>", "<|output_end|>"]
        self.ids = {name: vocab_size - 1 - i for i, name in enumerate(names)}
        self.bos_token_id = self.ids["<|bos|>"]

    def encode_special(self, name: str) -> int:
        return self.ids[name]


def random_model(depth: int, device: torch.device, dtype: torch.dtype) -> GPT:
    head_dim = 64 if device.type == "cpu" and depth < 8 else 128
    torch.manual_seed(0)
    model = GPT(scaling.model_config(depth, VOCAB, 2048, head_dim=head_dim))
    model.init_weights()
    with torch.no_grad():  # zero-initialised projections would make every layer an identity
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.set_compute_dtype(dtype)
    return model.to(device).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def plain_loop(model: GPT, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    ids = prompts
    for _ in range(new_tokens):
        next_ids = model(ids)[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
    return ids[:, prompts.size(1) :]


def engine_loop(engine: Engine, prompt: list[int], batch: int, new_tokens: int) -> torch.Tensor:
    columns = list(engine.generate(prompt, num_samples=batch, max_tokens=new_tokens, temperature=0))
    return torch.tensor([[token.id for token in column] for column in columns]).T


def measure(depth: int, batch: int, args: argparse.Namespace, device: torch.device, dtype) -> dict:
    model = random_model(depth, device, dtype)
    engine = Engine(model, RandomTokenizer(VOCAB))
    # Random weights: decode the full length in both loops, and never enter a tool call.
    engine.stop_tokens, engine.python_start = set(), -1
    prompt = torch.randint(0, VOCAB - 8, (args.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    prompts = torch.tensor([prompt] * batch, device=device)
    timings = {}
    outputs = {}
    for name, run in {
        "engine": lambda: engine_loop(engine, prompt, batch, args.new_tokens),
        "plain": lambda: plain_loop(model, prompts, args.new_tokens),
    }.items():
        run()  # warm-up
        synchronize(device)
        start = time.perf_counter()
        outputs[name] = run().cpu()
        synchronize(device)
        timings[name] = time.perf_counter() - start
    return {
        "depth": depth,
        "batch": batch,
        "engine_tok_s": round(batch * args.new_tokens / timings["engine"], 1),
        "plain_tok_s": round(batch * args.new_tokens / timings["plain"], 1),
        "speedup": round(timings["plain"] / timings["engine"], 2),
        "same_tokens": bool(torch.equal(outputs["engine"], outputs["plain"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (default: 64)")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated tokens (default: 64)")
    parser.add_argument("--dtype", default="auto", help="compute dtype (default: bf16 on CUDA, fp32 on CPU)")
    args = parser.parse_args()
    device = torch.device(autodetect_device())
    dtype = resolve_dtype(args.dtype, device)
    results = [measure(d, b, args, device, dtype) for d in args.depths for b in args.batches]
    machine = (
        f"{platform.machine()} {device.type}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(f"decode speed | {machine} | {dtype} | prompt {args.prompt}, {args.new_tokens} new tokens, greedy")
    print(f"{'depth':>5} {'batch':>5} {'engine tok/s':>13} {'no-cache tok/s':>15} {'speedup':>8} {'same':>5}")
    for r in results:
        print(
            f"{r['depth']:>5} {r['batch']:>5} {r['engine_tok_s']:>13,.1f} {r['plain_tok_s']:>15,.1f} "
            f"{r['speedup']:>7.2f}× {r['same_tokens']!s:>5}"
        )
    print(json.dumps({"bench": "engine", "machine": machine, "dtype": str(dtype), "results": results}))


if __name__ == "__main__":
    main()
