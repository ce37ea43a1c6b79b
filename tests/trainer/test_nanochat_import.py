"""Importing a nanochat checkpoint: the same model (logits) and tokenizer (ids) under our layout, without
running code from the files, and a clear refusal for layouts that are not nanochat 92d63d4's."""

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from trainer import nanochat_import, training
from trainer.checkpoint import load_model
from trainer.gpt import GPT, GPTConfig
from trainer.runtime import Runtime
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer


def nanochat_name(name: str) -> str:
    """Ours → nanochat's, with the prefix a compiled model's state dict has."""
    name = (
        "transformer." + name
        if name.startswith("wte.")
        else re.sub(r"^blocks\.(\d+)\.", r"transformer.h.\1.", name)
    )
    return "_orig_mod." + name


def write_nanochat_checkpoint(base_dir: Path, model: GPT, tokenizer: Tokenizer, step: int) -> None:
    """What nanochat writes: tokenizer.pkl (its pickled tiktoken encoding), model_<step>.pt with its names
    (the embedding in bf16, as a GPU run keeps it) and meta_<step>.json."""
    (base_dir / "tokenizer").mkdir(parents=True)
    with open(base_dir / "tokenizer" / "tokenizer.pkl", "wb") as f:
        pickle.dump(tokenizer.encoding, f)
    folder = base_dir / "base_checkpoints" / f"d{model.config.n_layer}"
    folder.mkdir(parents=True)
    state = {
        nanochat_name(k): v.bfloat16() if k == "wte.weight" else v for k, v in model.state_dict().items()
    }
    torch.save(state, folder / f"model_{step:06d}.pt")
    shape = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")
    meta = {
        "step": step,
        "val_bpb": 1.23,
        "model_config": {key: getattr(model.config, key) for key in shape},
        "user_config": {"matrix_lr": 0.02, "embedding_lr": 0.3, "unembedding_lr": 0.008, "scalar_lr": 0.5},
        "device_batch_size": 4,
        "max_seq_len": 64,
        "total_batch_size": 1024,
    }
    (folder / f"meta_{step:06d}.json").write_text(json.dumps(meta))


@pytest.fixture
def trained_elsewhere(tmp_path: Path, tiny_tokenizer: Tokenizer) -> tuple[Path, GPT]:
    """A nanochat base dir holding a small model with weights that are all non-trivial."""
    config = GPTConfig(
        sequence_len=64,
        vocab_size=tiny_tokenizer.vocab_size,
        n_layer=2,
        n_head=2,
        n_kv_head=2,
        n_embd=128,
        window_pattern="SL",
    )
    torch.manual_seed(0)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised tensor may hide a mix-up
            p.add_(0.05 * torch.randn_like(p))
        model.wte.weight.copy_(model.wte.weight.bfloat16())  # what survives nanochat's bf16 embedding
    write_nanochat_checkpoint(tmp_path / "nanochat", model, tiny_tokenizer, step=7)
    return tmp_path / "nanochat", model


def test_an_imported_model_computes_what_it_computed_there(
    trained_elsewhere, tmp_path: Path, tiny_tokenizer
) -> None:
    nanochat_dir, original = trained_elsewhere
    settings = TrainerSettings(base_dir=tmp_path / "ours")
    folder = nanochat_import.import_checkpoint(settings, nanochat_dir, run="imported", stage="base")
    assert folder == settings.run_dir("imported") / "base" / "step_000007"
    model, meta = load_model(folder.parent, 7, torch.device("cpu"), torch.float32)
    ids = torch.tensor(
        [tiny_tokenizer.encode("doc0001: kato mine rusa lipo", prepend=tiny_tokenizer.bos_token_id)]
    )
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), original.eval()(ids))
    assert Tokenizer.load(settings.run_dir("imported") / "tokenizer").ranks == tiny_tokenizer.ranks
    assert meta["recipe"]["total_batch_size"] == 1024 and meta["val_bpb"] == 1.23
    # Its optimizer state is not imported: a chat stage fine-tuning it starts its optimizer afresh.
    optimizer = training.build_optimizer(model, training.Recipe(**meta["recipe"]), weight_decay=0.0)
    runtime = Runtime(torch.device("cpu"), torch.float32)
    assert training.warm_start_optimizer(optimizer, folder.parent, 7, runtime) is False


def test_a_tokenizer_pickle_asking_for_anything_but_an_encoding_is_refused_unrun(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(nanochat_import.ImportRefused, match=r"asks for posix\.system"):
        nanochat_import.read_tokenizer(tmp_path / "tokenizer")
    assert not (tmp_path / "ran").exists()


def test_an_older_nanochat_layout_is_refused_with_the_reason(trained_elsewhere, tmp_path: Path) -> None:
    nanochat_dir, _ = trained_elsewhere
    path = nanochat_dir / "base_checkpoints" / "d2" / "model_000007.pt"
    state = torch.load(path, weights_only=True)
    state["_orig_mod.transformer.h.1.attn.ve_gate.weight"] = torch.zeros(2, 32)  # January's 32-channel gates
    torch.save(state, path)
    with pytest.raises(nanochat_import.ImportRefused, match=r"blocks\.1\.attn\.ve_gate\.weight: \(2, 32\)"):
        nanochat_import.import_checkpoint(
            TrainerSettings(base_dir=tmp_path / "ours"), nanochat_dir, "old", "base"
        )
    assert not (tmp_path / "ours" / "runs" / "old").exists()  # nothing half-written


def test_a_run_with_another_tokenizer_is_not_imported_into(
    trained_elsewhere, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nanochat_dir, _ = trained_elsewhere
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "ours"))
    settings = TrainerSettings()
    Tokenizer.train(["something else entirely"] * 20, vocab_size=280).save(
        settings.run_dir("taken") / "tokenizer"
    )
    with pytest.raises(nanochat_import.ImportRefused, match="already has another tokenizer"):
        nanochat_import.main(["--from", str(nanochat_dir), "--run", "taken"])
