"""A model server started as a real process (`python -m inference`) over tiny checkpoints of our own."""

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save_file

from inference.paged_cache import PagedKVCache
from inference.prefill import Prefill
from tests.support import PYTHON, Process, free_port, service_env, wait_until
from tests.trainer.conftest import make_documents
from trainer.checkpoint import step_dir
from trainer.gpt import GPT, GPTConfig
from trainer.tokenizer import SPECIAL_TOKENS, Tokenizer

TOKEN = "inference-test-token-0123456789"
AUTH_HEADER = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = GPTConfig(sequence_len=256, vocab_size=600, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
# Slow enough on CPU that a long reply takes seconds: room to act while it is generated.
SLOW_CONFIG = GPTConfig(sequence_len=8192, vocab_size=600, n_layer=6, n_head=6, n_kv_head=6, n_embd=384)


def write_checkpoint(
    runs: Path,
    run: str,
    stage: str,
    step: int,
    seed: int,
    config: GPTConfig = CONFIG,
    never_stop: bool = False,
    nan_token: int | None = None,
) -> GPT:
    """A checkpoint in the trainer's layout whose weights are random but far from the init's near-zero
    logits, so that greedy choices are clear-cut. A `nan_token` has a NaN embedding: the model gives
    NaN logits after any prompt that holds it, and only there."""
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
        if never_stop:  # a special token's logit is half of token 0's: never the largest when greedy
            model.lm_head.weight[config.vocab_size - len(SPECIAL_TOKENS) :] = 0.5 * model.lm_head.weight[0]
        if nan_token is not None:
            model.wte.weight[nan_token] = float("nan")
    folder = step_dir(runs / run / stage, step)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    meta = {"step": step, "model_config": config.to_dict(), "compute_dtype": "float32", "world_size": 1}
    (folder / "meta.json").write_text(json.dumps(meta))
    return model


@pytest.fixture(scope="session")
def served_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run 'tiny' with a tokenizer, an sft checkpoint at steps 5 and 10 and a base one at step 3."""
    base = tmp_path_factory.mktemp("inference-base")
    runs = base / "runs"
    tiny_tokenizer().save(runs / "tiny" / "tokenizer")
    write_checkpoint(runs, "tiny", "base", 3, seed=3)
    write_checkpoint(runs, "tiny", "sft", 5, seed=5)
    write_checkpoint(runs, "tiny", "sft", 10, seed=10)
    return base


@pytest.fixture(scope="session")
def slow_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run 'slow' with one sft checkpoint of SLOW_CONFIG whose greedy replies run to max_tokens."""
    base = tmp_path_factory.mktemp("inference-slow")
    tiny_tokenizer().save(base / "runs" / "slow" / "tokenizer")
    write_checkpoint(base / "runs", "slow", "sft", 1, seed=1, config=SLOW_CONFIG, never_stop=True)
    return base


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> GPT:
    """The tiny model, in eval mode, whose greedy replies run to max_tokens."""
    runs = tmp_path_factory.mktemp("never-stopping") / "runs"
    return write_checkpoint(runs, "tiny", "sft", 1, seed=10, never_stop=True).eval()


def random_prompt(length: int, seed: int) -> list[int]:
    """Ordinary tokens of the tiny vocab, the same for the same seed."""
    return torch.randint(0, 500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def prefilled_pool(
    model: GPT, prompts: list[list[int]], max_rows: int, num_blocks: int, prefix_tokens: int = 0
) -> PagedKVCache:
    """A paged pool whose first rows hold the prompts, prefilled together (padded to the longest) on
    the pool as the scheduler does, each row then joined to the batch."""
    pool = PagedKVCache(model, max_rows=max_rows, num_blocks=num_blocks, prefix_tokens=prefix_tokens)
    none = [None] * len(prompts)
    with torch.inference_mode():
        prefill = Prefill.start(model, pool, prompts, none, [False] * len(prompts), None, [0] * len(prompts))
        prefill.step()
        for row in range(len(prompts)):
            pool.take_row(prefill.cache, row, [row], prefill.spare[row])
    return pool


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train(make_documents(200, seed=1), vocab_size=CONFIG.vocab_size)


def start_server(base: Path, workdir: Path, **settings: str) -> tuple[Process, str]:
    port = free_port()
    env = service_env(
        NANOCHAT_BASE_DIR=str(base),
        API_TOKEN=TOKEN,
        INFERENCE_PORT=str(port),
        INFERENCE_CORS_ORIGINS="http://web.example",
        **settings,
    )
    server = Process("inference", [PYTHON, "-m", "inference"], env, workdir)
    url = f"http://127.0.0.1:{port}"
    server.wait_healthy(f"{url}/health", timeout=60)
    # ready: the default model is loaded and its warm-up token is out of the way
    wait_until(lambda: httpx.get(f"{url}/ready", headers=AUTH_HEADER).status_code == 200, 60, "/ready")
    return server, url


@pytest.fixture(scope="module")
def server(served_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start_server(served_base, tmp_path_factory.mktemp("inference"))
    yield url
    process.stop()
