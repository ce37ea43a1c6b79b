"""Models in and out, through the server: a model trained here and exported answers in transformers what our
server answers (greedy), and a transformers-format NanoChat model imported here is served with the reply
transformers itself gives."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from tests.inference.conftest import AUTH_HEADER, start_server, tiny_tokenizer, write_checkpoint
from trainer import export, hf_tokenizer, model_import
from trainer.settings import TrainerSettings
from trainer.tokenizer import SPECIAL_TOKENS

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "Another one?"},
    ],
]
MAX_TOKENS = 24


def published_nanochat(folder: Path) -> None:
    """What transformers' own NanoChat class writes, with weights far from its near-zero init so that
    greedy choices are clear-cut, and our tokenizer as tokenizer.json. As in write_checkpoint(never_stop),
    no special token is ever the greedy choice: replies are plain text of MAX_TOKENS tokens (transformers
    runs no tool calls, and decodes without the special tokens the server shows)."""
    torch.manual_seed(7)
    config = transformers.NanoChatConfig(
        vocab_size=640, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
    )  # fmt: skip
    model = transformers.NanoChatForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
        first_special = tiny_tokenizer().vocab_size - len(SPECIAL_TOKENS)
        model.lm_head.weight[first_special:] = 0.5 * model.lm_head.weight[0]
    model.save_pretrained(folder)
    hf_tokenizer.write(tiny_tokenizer(), folder, 256)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run 'here' (our architecture, exported) and run 'imp' (a NanoChat folder, imported)."""
    base = tmp_path_factory.mktemp("exported-base")
    tiny_tokenizer().save(base / "runs" / "here" / "tokenizer")
    write_checkpoint(base / "runs", "here", "sft", 4, seed=4, never_stop=True)
    settings = TrainerSettings(base_dir=base)
    export.export(settings, "here", "sft", None, None)
    published_nanochat(base / "published")
    model_import.import_model(settings, "published", "imp", "sft")
    return base


@pytest.fixture(scope="module")
def server(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start_server(base, tmp_path_factory.mktemp("inference"))
    yield url
    process.stop()


def served_reply(server: str, model: str, messages: list[dict]) -> str:
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, headers=AUTH_HEADER, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def transformers_reply(folder: Path, messages: list[dict], remote_code: bool) -> str:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote_code).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**prompt, max_new_tokens=MAX_TOKENS, do_sample=False)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one turn", "system and two turns"])
def test_an_export_answers_in_transformers_what_our_server_answers(server: str, base: Path, messages) -> None:
    folder = base / "runs" / "here" / "exports" / "here-sft-000004"
    expected = transformers_reply(folder, messages, remote_code=True)
    assert served_reply(server, "here-sft-000004", messages) == expected


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one turn", "system and two turns"])
def test_an_imported_nanochat_model_is_served_with_transformers_own_reply(
    server: str, base: Path, messages
) -> None:
    expected = transformers_reply(base / "published", messages, remote_code=False)
    assert served_reply(server, "imp-sft-000000", messages) == expected
