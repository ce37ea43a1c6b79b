"""
Import a published model as a stage checkpoint of a run, so it is served, evaluated and fine-tuned like one
trained here:

    python -m trainer.model_import --source karpathy/nanochat-d32 --run d32          # a Hugging Face repo
    python -m trainer.model_import --source ~/models/mine --run mine --stage base    # a local folder

The source is a folder (as given, or under the base dir) or else a Hugging Face repo id, downloaded into
the base dir's hub/ folder (only its json, safetensors and tokenizer files: no code is fetched or run).
It may hold:
- a transformers NanoChat model (config.json `model_type: nanochat`: transformers' built-in class, the
  older nanochat architecture), with its tokenizer as tokenizer.json or nanochat's tokenizer.pkl;
- one of our exports (`model_type: nanochat_stack`, trainer.export), which keeps its recipe and step;
- a native karpathy/nanochat base dir (tokenizer/tokenizer.pkl, *_checkpoints/): trainer.nanochat_import.
Pickles are never unpickled with the general unpickler; safetensors weights only (a .bin is refused).
"""

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from trainer import checkpoint, hf_tokenizer, nanochat_import, report
from trainer.checkpoint import ImportRefused
from trainer.common import CHECKPOINT_STEP, add_run_flag, print0
from trainer.export import BUILTIN_PARTS, model_id
from trainer.gpt import GPTConfig
from trainer.report import STAGES
from trainer.scaling import REFERENCE_BATCH
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer

HUB_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
HUB_FILES = ["*.json", "*.safetensors", "tokenizer/*", "*.tiktoken", "*.pkl"]


# -- where the model is ------------------------------------------------------------------------------------


def locate(settings: TrainerSettings, source: str, revision: str | None) -> Path:
    """The folder `source` names: a path (as given, else under the base dir), else a downloaded hub repo."""
    base_dir = settings.base_dir.expanduser()
    for folder in (Path(source).expanduser(), base_dir / source):
        if folder.is_dir():
            return folder
    if not HUB_REPO.fullmatch(source):
        raise ImportRefused(f"no folder {source!r} (looked as given and in {base_dir}), nor a hub repo id")
    from huggingface_hub import snapshot_download  # only needed for downloads

    print0(f"downloading {source}" + (f" at {revision}" if revision else "") + " from the Hugging Face hub")
    try:
        path = snapshot_download(
            source, revision=revision, allow_patterns=HUB_FILES, cache_dir=base_dir / "hub"
        )
    except Exception as error:  # offline, no such repo, gated: the hub's own words say which
        raise ImportRefused(f"could not download {source}: {error}") from error
    return Path(path)


# -- transformers' NanoChat class and our exports ------------------------------------------------------


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards its index names."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {name: t for shard in shards for name, t in load_file(folder / shard).items()}
    if (folder / "model.safetensors").exists():
        return load_file(folder / "model.safetensors")
    raise ImportRefused(f"{folder} has no model.safetensors (pickled .bin weights are not read)")


def read_tokenizer(folder: Path) -> Tokenizer:
    if (folder / "tokenizer.json").exists():
        try:
            return hf_tokenizer.read(folder / "tokenizer.json")
        except hf_tokenizer.TokenizerRefused as error:
            raise ImportRefused(str(error)) from error
    for candidate in (folder, folder / "tokenizer"):
        if (candidate / "tokenizer.pkl").exists():
            return nanochat_import.read_tokenizer(candidate)
    raise ImportRefused(f"{folder} has no tokenizer.json or tokenizer.pkl")


def builtin_config(hf: dict[str, Any], vocab_size: int) -> GPTConfig:
    """Our config for transformers' NanoChatForCausalLM; refused where it computes something ours cannot."""
    width, heads = hf["hidden_size"], hf["num_attention_heads"]
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10_000.0)}
    differences = {
        "hidden_act": (hf.get("hidden_act", "relu2"), "relu2"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "intermediate_size": (hf.get("intermediate_size"), 4 * width),
        "head_dim": (hf.get("head_dim") or width // heads, width // heads),
        "rope_type": (rope.get("rope_type", "default"), "default"),
    }
    unsupported = [
        f"{key} {found!r} (ours: {ours!r})" for key, (found, ours) in differences.items() if found != ours
    ]
    if hf.get("final_logit_softcapping") is None:
        unsupported.append("no logit soft-cap (ours always caps)")
    if hf["vocab_size"] < vocab_size:
        unsupported.append(f"vocab {hf['vocab_size']} smaller than its tokenizer's {vocab_size}")
    if unsupported:
        raise ImportRefused("this NanoChat model differs from what ours computes: " + "; ".join(unsupported))
    return GPTConfig(
        sequence_len=hf.get("max_position_embeddings", 2048),
        vocab_size=vocab_size,
        n_layer=hf["num_hidden_layers"],
        n_head=heads,
        n_kv_head=hf.get("num_key_value_heads") or heads,
        n_embd=width,
        window_pattern="L",
        rope_base=float(rope["rope_theta"]),
        softcap=float(hf["final_logit_softcapping"]),
        qk_scale=1.0,
        value_embeds=False,
        smear=False,
        backout=False,
        layer_scalars=False,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
    )


def builtin_weights(weights: dict[str, torch.Tensor], hf: dict[str, Any], config: GPTConfig) -> dict:
    """NanoChatForCausalLM's names → ours; the vocabulary rows fitted to our padded size."""
    parts = {theirs: ours for ours, theirs in BUILTIN_PARTS.items()}
    layer_name = re.compile(r"^model\.layers\.([0-9]+)\.(.+)\.weight$")
    embedding = weights["model.embed_tokens.weight"]
    head = embedding if hf.get("tie_word_embeddings") else weights["lm_head.weight"]
    ours = {"wte.weight": fit_rows(embedding, config), "lm_head.weight": fit_rows(head, config)}
    for name, tensor in weights.items():
        if (match := layer_name.match(name)) and match.group(2) in parts:
            ours[f"blocks.{match.group(1)}.{parts[match.group(2)]}.weight"] = tensor
        elif name not in ("model.embed_tokens.weight", "lm_head.weight"):
            raise ImportRefused(f"weight {name} has no place in our model")
    return ours


def fit_rows(matrix: torch.Tensor, config: GPTConfig) -> torch.Tensor:
    """The first padded_vocab_size rows, zero rows added where the model has fewer (never produced)."""
    rows = config.padded_vocab_size
    matrix = matrix[:rows]
    return (
        torch.cat([matrix, matrix.new_zeros(rows - len(matrix), matrix.size(1))])
        if len(matrix) < rows
        else matrix
    )


def default_recipe(sequence_len: int) -> dict[str, Any]:
    """What a chat stage inherits from a model without a recorded recipe: the reference's LRs and batch."""
    return {
        "max_seq_len": sequence_len,
        "device_batch_size": 32,
        "total_batch_size": REFERENCE_BATCH,
        "lr_scale": 1.0,
        "matrix_lr": 0.02,
        "embedding_lr": 0.3,
        "unembedding_lr": 0.008,
        "scalar_lr": 0.5,
    }


def import_hf_folder(settings: TrainerSettings, folder: Path, run: str, stage: str) -> tuple[Path, str]:
    """A transformers-format folder (built-in NanoChat or our export) → a stage checkpoint."""
    hf = json.loads((folder / "config.json").read_text())
    tokenizer = read_tokenizer(folder)
    weights = read_safetensors(folder)
    ours = hf.get("nanochat_stack", {})
    if hf["model_type"] == "nanochat":
        config = builtin_config(hf, tokenizer.vocab_size)
        weights = builtin_weights(weights, hf, config)
    else:
        fields = set(GPTConfig.__dataclass_fields__)
        config = GPTConfig(**{key: value for key, value in hf.items() if key in fields})
    recipe = ours.get("recipe") or default_recipe(config.sequence_len)
    meta = {"val_bpb": None, "recipe": recipe, "imported_from": {"folder": str(folder), **ours}}
    step = ours.get("step", 0)
    destination = checkpoint.save_imported(
        settings.run_dir(run), stage, step, weights, config, tokenizer, meta
    )
    return destination, hf["model_type"]


# -- the program -----------------------------------------------------------------------------------------


def import_model(
    settings: TrainerSettings, source: str, run: str, stage: str, revision: str | None = None,
    model_tag: str | None = None, step: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Import whatever `source` holds; returns the report section."""
    started = time.time()
    folder = locate(settings, source, revision)
    config_path = folder / "config.json"
    if config_path.exists():
        model_type = json.loads(config_path.read_text()).get("model_type")
        if model_type not in ("nanochat", "nanochat_stack"):
            raise ImportRefused(f"{source} is a {model_type!r} model: only NanoChat models are imported")
        destination, kind = import_hf_folder(settings, folder, run, stage)
    elif (folder / "tokenizer" / "tokenizer.pkl").exists():
        destination = nanochat_import.import_checkpoint(settings, folder, run, stage, stage, model_tag, step)
        kind = "nanochat (native)"
    else:
        raise ImportRefused(
            f"{folder} holds neither a config.json (a transformers model) nor tokenizer/tokenizer.pkl "
            "(a native nanochat base dir)"
        )
    imported_step = int(destination.name.removeprefix("step_"))
    name = model_id(run, stage, imported_step)
    print0(f"imported {source} ({kind}) as {name} in {destination}")
    return {
        "model": name,
        "source": source,
        "format": kind,
        "path": str(destination),
        "wall_seconds": time.time() - started,
    }


parser = argparse.ArgumentParser(description="Import a NanoChat model as a stage checkpoint of a run.")
parser.add_argument(
    "--source", required=True, help="a folder (as given, or under the base dir) or a Hugging Face repo id"
)
parser.add_argument("--revision", default=None, help="the hub repo's branch, tag or commit (default: main)")
add_run_flag(parser)
parser.add_argument(
    "--stage", choices=STAGES, default="sft", help="the run's stage it becomes (default: sft)"
)
parser.add_argument(
    "--model-tag", default=None, help="native nanochat dirs: its model tag (default: deepest)"
)
parser.add_argument(
    "--step", type=CHECKPOINT_STEP, default=None, help="native nanochat dirs: its step (default: latest)"
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser.parse_args(argv)
    settings = TrainerSettings()
    section = import_model(
        settings, args.source, args.run, args.stage, args.revision, args.model_tag, args.step
    )
    report.write_section(settings, args.run, "model_import", section, vars(args))
    return section


if __name__ == "__main__":
    main()
