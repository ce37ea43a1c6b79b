"""Models in and out: an export is loaded by transformers and computes what our model computes (logits,
greedy text, token ids), in both architectures; transformers-format NanoChat folders and our exports come
back as stage checkpoints that compute the same and fine-tune; what cannot be imported is refused."""

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer import chat_sft, export, hf_tokenizer, model_import
from trainer.chat_format import render_for_completion
from trainer.checkpoint import ImportRefused, load_model
from trainer.engine import Engine
from trainer.gpt import GPT, GPTConfig
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

ARCHITECTURES = {
    "ours": ({}, "NanoChatStackForCausalLM"),
    "builtin": (export.BUILTIN_ARCHITECTURE, "NanoChatForCausalLM"),
}
PROMPTS = [
    "doc0001: kato mine rusa lipo",
    "The quick brown fox jumps over the lazy dog, 12345 times.",
    "héllo wörld 😀\n\n  tabs\tand   spaces",
]


def save_run(base: Path, run: str, model: GPT, tokenizer: Tokenizer, step: int = 5) -> None:
    """A run with a tokenizer and one sft checkpoint of `model`."""
    tokenizer.save(base / "runs" / run / "tokenizer")
    folder = base / "runs" / run / "sft" / f"step_{step:06d}"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    recipe = model_import.default_recipe(model.config.sequence_len) | {"total_batch_size": 256}
    meta = {"step": step, "model_config": model.config.to_dict(), "val_bpb": 1.5, "recipe": recipe}
    (folder / "meta.json").write_text(json.dumps(meta))


def random_model(tokenizer: Tokenizer, **architecture) -> GPT:
    """A small model whose every tensor is non-trivial (a zero-initialised one could hide a mix-up)."""
    torch.manual_seed(0)
    config = GPTConfig(
        sequence_len=128, vocab_size=tokenizer.vocab_size, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
        **architecture,
    )  # fmt: skip
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # far from the init: greedy choices are clear-cut
    return model.eval()


@pytest.fixture(params=sorted(ARCHITECTURES))
def exported(request, tmp_path: Path, tiny_tokenizer: Tokenizer, monkeypatch) -> tuple[GPT, dict, str]:
    """Each architecture trained 'here' and exported with the CLI: (our model, the report section, its
    expected transformers class)."""
    architecture, expected = ARCHITECTURES[request.param]
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    model = random_model(tiny_tokenizer, **architecture)
    save_run(tmp_path, "r", model, tiny_tokenizer)
    return model, export.main(["--run", "r", "--stage", "sft"]), expected


def test_an_export_loads_in_transformers_with_our_logits_and_greedy_text(exported, tiny_tokenizer) -> None:
    model, section, architecture = exported
    assert section["architecture"] == architecture and section["model"] == "r-sft-000005"
    remote = architecture == "NanoChatStackForCausalLM"
    folder = Path(section["path"])
    assert (folder / "modeling_nanochat_stack.py").exists() == remote
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote).eval()
    assert type(hf).__name__ == architecture
    engine = Engine(model, tiny_tokenizer)
    for text in PROMPTS:
        ids = tiny_tokenizer.encode(text, prepend=tiny_tokenizer.bos_token_id)
        with torch.no_grad():
            ours, theirs = model(torch.tensor([ids])), hf(torch.tensor([ids])).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        (completion,) = engine.complete(ids, max_tokens=24, temperature=0)
        generated = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[
            0, len(ids) :
        ].tolist()
        stops = {tiny_tokenizer.bos_token_id, tiny_tokenizer.encode_special("<|assistant_end|>")}
        assert [t for t in generated if t not in stops] == [t.id for t in completion]


def test_the_exports_tokenizer_and_chat_template_give_our_ids(exported, tiny_tokenizer) -> None:
    _, section, _ = exported
    hf = transformers.AutoTokenizer.from_pretrained(section["path"])
    for text in PROMPTS:
        assert hf(text, add_special_tokens=False)["input_ids"] == tiny_tokenizer.encode(text)
        assert hf(text)["input_ids"] == tiny_tokenizer.encode(text, prepend=tiny_tokenizer.bos_token_id)
        assert hf.decode(tiny_tokenizer.encode(text)) == text
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    templated = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert templated["input_ids"] == render_for_completion(tiny_tokenizer, messages)


def test_the_tarball_holds_the_complete_folder_and_the_card_its_numbers(exported) -> None:
    _, section, architecture = exported
    folder, tarball = Path(section["path"]), Path(section["tarball"])
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "README.md"}  # fmt: skip
    assert {f"r-sft-000005/{name}" for name in expected} <= names
    assert section["tarball_bytes"] == tarball.stat().st_size
    card = (folder / "README.md").read_text()
    assert "val_bpb: 1.5000" in card and architecture in card
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "a temp file was left"


def test_kit_texts_tokenize_alike_through_the_exported_tokenizer(env: Path, data_kit: Path, tmp_path) -> None:
    tokenizer = Tokenizer.load(env / "runs" / "r" / "tokenizer")
    hf_tokenizer.write(tokenizer, tmp_path, 2048)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    shard = sorted((data_kit / "pretrain").glob("*.parquet"))[0]
    texts = pq.read_table(shard).column("text").to_pylist()[:200]
    conversations = (data_kit / "sft" / "customjson_sample.jsonl").read_text().splitlines()[:50]
    texts += [
        m["content"] for line in conversations for m in json.loads(line) if isinstance(m["content"], str)
    ]
    assert [hf(t, add_special_tokens=False)["input_ids"] for t in texts] == tokenizer.encode_batch(texts)


def transformers_nanochat(folder: Path, tokenizer: Tokenizer, **overrides) -> torch.nn.Module:
    """What transformers' own NanoChat class writes from a tiny random config, with our tokenizer."""
    torch.manual_seed(1)
    config = transformers.NanoChatConfig(
        vocab_size=640, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, **overrides,
    )  # fmt: skip
    model = transformers.NanoChatForCausalLM(config).eval()
    model.save_pretrained(folder)
    hf_tokenizer.write(tokenizer, folder, 128)
    return model


def test_a_transformers_nanochat_folder_is_imported_served_alike_and_fine_tuned(
    tmp_path: Path, tiny_tokenizer: Tokenizer, data_kit: Path, monkeypatch
) -> None:
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(data_kit))
    original = transformers_nanochat(tmp_path / "published", tiny_tokenizer)
    section = model_import.main(["--source", str(tmp_path / "published"), "--run", "imp"])
    assert section["model"] == "imp-sft-000000" and section["format"] == "nanochat"
    model, meta = load_model(Path(section["path"]).parent, 0, torch.device("cpu"), torch.float32)
    ids = tiny_tokenizer.encode(PROMPTS[1], prepend=tiny_tokenizer.bos_token_id)
    with torch.no_grad():
        theirs = original(torch.tensor([ids])).logits[..., : tiny_tokenizer.vocab_size]
        torch.testing.assert_close(model.eval()(torch.tensor([ids])), theirs, atol=1e-4, rtol=0)
    assert meta["imported_from"]["folder"] == str(tmp_path / "published")
    flags = "--num-iterations 2 --max-seq-len 64 --device-batch-size 2 --total-batch-size 128 --eval-every -1"
    summary = chat_sft.main(["--run", "tuned", "--source-run", "imp", "--source", "sft", *flags.split()])
    assert summary["source"] == "imp/sft step 0" and summary["steps"] == 2


def test_our_exports_come_back_as_the_same_model_with_their_recipe(exported, tmp_path: Path) -> None:
    model, section, _ = exported
    relative = str(Path(section["path"]).relative_to(tmp_path))  # a folder under the base dir
    imported = model_import.main(["--source", relative, "--run", "back", "--stage", "base"])
    assert imported["model"] == "back-base-000005"
    again, meta = load_model(Path(imported["path"]).parent, 5, torch.device("cpu"), torch.float32)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(again.eval()(ids), model(ids))
    assert meta["recipe"]["total_batch_size"] == 256  # the exported run's, not a default


def test_imports_that_cannot_be_taken_are_refused_with_the_reason_and_write_nothing(
    tmp_path: Path, tiny_tokenizer: Tokenizer, monkeypatch
) -> None:
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = TrainerSettings()
    published = tmp_path / "published"
    transformers_nanochat(published, tiny_tokenizer, hidden_act="gelu")
    with pytest.raises(ImportRefused, match=r"hidden_act 'gelu' \(ours: 'relu2'\)"):
        model_import.import_model(settings, str(published), "bad", "sft")

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ImportRefused, match="a 'llama' model: only NanoChat models"):
        model_import.import_model(settings, str(llama), "bad", "sft")

    pickled = tmp_path / "pickled"
    transformers_nanochat(pickled, tiny_tokenizer)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(ImportRefused, match=r"no model\.safetensors \(pickled \.bin weights are not read\)"):
        model_import.import_model(settings, str(pickled), "bad", "sft")

    reordered = tmp_path / "reordered"
    transformers_nanochat(reordered, tiny_tokenizer)
    data = json.loads((reordered / "tokenizer.json").read_text())
    data["model"]["merges"].reverse()
    (reordered / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ImportRefused, match="merge order is not its id order"):
        model_import.import_model(settings, str(reordered), "bad", "sft")

    with pytest.raises(ImportRefused, match="could not download someone/nothing-here"):
        model_import.import_model(settings, "someone/nothing-here", "bad", "sft")
    with pytest.raises(ImportRefused, match="nor a hub repo id"):
        model_import.import_model(settings, "no/such/folder", "bad", "sft")
    assert not (base / "runs" / "bad").exists()

    transformers_nanochat(tmp_path / "good", tiny_tokenizer)
    model_import.import_model(settings, str(tmp_path / "good"), "ok", "sft")
    with pytest.raises(ImportRefused, match="exists already"):
        model_import.import_model(settings, str(tmp_path / "good"), "ok", "sft")


def test_an_export_keeps_the_checkpoint_weights_exactly(exported, tmp_path: Path) -> None:
    model, section, architecture = exported
    weights = load_file(Path(section["path"]) / "model.safetensors")
    if architecture == "NanoChatStackForCausalLM":
        assert weights.keys() == model.state_dict().keys()
    vocab = model.config.vocab_size
    key = "wte.weight" if "wte.weight" in weights else "model.embed_tokens.weight"
    assert torch.equal(weights[key][:vocab], model.wte.weight[:vocab])
