"""
Import a model trained by karpathy/nanochat, from its own checkpoint layout, as a stage checkpoint of one
of our runs: it is then served, evaluated and fine-tuned like a model trained here.

    python -m trainer.nanochat_import --from ~/.cache/nanochat --run imported        # its latest base model
    python -m trainer.nanochat_import --from DIR --source sft --model-tag d20 --step 650 --run mine

nanochat keeps `<base dir>/tokenizer/tokenizer.pkl` (a pickled tiktoken encoding) and
`<base dir>/{base,chatsft,chatrl}_checkpoints/<tag>/model_<step>.pt` (a torch.save'd state dict) with
`meta_<step>.json`. Neither file is unpickled with the general unpickler, so importing never runs code
from them: the weights load with torch's weights-only loader (tensors and plain containers), and the
tokenizer's pickle with an unpickler that knows one class, a stand-in for tiktoken's Encoding that only
keeps its ranks. Its optimizer state is not imported (a chat stage fine-tuning it starts its optimizer
afresh and says so).

The layout must be nanochat's at 92d63d4 (July 2026: value embeddings with 12-channel gates, smear,
backout, per-layer scalars), which is our model's: every tensor must have its place and shape here.
What a checkpoint cannot show is taken to be that version's too: rotary base 100,000, QK scale 1.2,
logit soft-cap 15. Older layouts (value-embedding gates over 32 channels, rotary base 10,000) are
refused with the reason.
"""

import argparse
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint
from trainer.checkpoint import ImportRefused
from trainer.common import add_run_flag, print0
from trainer.gpt import GPTConfig
from trainer.scaling import REFERENCE_BATCH
from trainer.settings import TrainerSettings
from trainer.tokenizer import SPECIAL_TOKENS, Tokenizer

CHECKPOINT_FOLDERS = {
    "base": "base_checkpoints",
    "mid": "mid_checkpoints",  # the classic recipe's
    "sft": "chatsft_checkpoints",
    "rl": "chatrl_checkpoints",
}
MODEL_FILE = re.compile(r"^model_([0-9]{6})\.pt$")


# -- the tokenizer -----------------------------------------------------------------


class EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling: keeps the state tiktoken pickles (name,
    split pattern, ranks, special tokens) without constructing anything."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise ImportRefused(
                f"the tokenizer pickles a named encoding ({state!r}), not nanochat's own ranks"
            )
        self.state = state


class TokenizerUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> type:
        if (module, name) == ("tiktoken.core", "Encoding"):
            return EncodingState
        raise ImportRefused(f"tokenizer.pkl asks for {module}.{name}: only a tiktoken encoding is read")


def read_tokenizer(folder: Path) -> Tokenizer:
    """nanochat's tokenizer.pkl as our Tokenizer: the same ranks, split pattern and special-token ids."""
    with open(folder / "tokenizer.pkl", "rb") as f:
        pickled = TokenizerUnpickler(f).load()
    if not isinstance(pickled, EncodingState):
        raise ImportRefused(f"{folder / 'tokenizer.pkl'} does not hold a tiktoken encoding")
    state = pickled.state
    ranks = state["mergeable_ranks"]
    tokenizer = Tokenizer(ranks, state["pat_str"])
    if state["special_tokens"] != tokenizer.special_tokens:
        raise ImportRefused(
            f"its special tokens {sorted(state['special_tokens'])} differ from ours "
            f"({', '.join(SPECIAL_TOKENS)}, after the ranks)"
        )
    return tokenizer


# -- the weights -------------------------------------------------------------------


def our_name(name: str) -> str:
    """nanochat's parameter name → ours (a compiled model's `_orig_mod.` prefix dropped)."""
    name = name.removeprefix("_orig_mod.").replace("transformer.wte.", "wte.", 1)
    return re.sub(r"^transformer\.h\.(\d+)\.", r"blocks.\1.", name)


def model_config(nanochat_config: dict, weights: dict[str, torch.Tensor]) -> GPTConfig:
    """Our config for a nanochat model: its shape from meta.json, its optional parts from the weights."""
    shape = {
        key: nanochat_config[key]
        for key in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
    }
    return GPTConfig(
        **shape,
        window_pattern=nanochat_config.get("window_pattern", "L"),  # before windows: full context
        value_embeds=any(name.startswith("value_embeds.") for name in weights),
        smear="smear_gate.weight" in weights,
        backout="backout_lambda" in weights,
    )


def read_weights(folder: Path, step: int) -> tuple[dict[str, torch.Tensor], GPTConfig, dict]:
    """A nanochat checkpoint's weights under our names (fp32) and our config for them; its meta.json."""
    meta = json.loads((folder / f"meta_{step:06d}.json").read_text())
    state = torch.load(folder / f"model_{step:06d}.pt", map_location="cpu", weights_only=True)
    weights = {our_name(name): tensor.float() for name, tensor in state.items()}
    config = model_config(meta["model_config"], weights)
    checkpoint.check_shapes(
        weights, config, f"{folder} is not nanochat 92d63d4's layout, which is the one imported"
    )
    return weights, config, meta


# -- where, and the import itself -------------------------------------------------


def find_checkpoint(base_dir: Path, source: str, model_tag: str | None, step: int | None) -> tuple[Path, int]:
    """nanochat's own choice when none is given: the deepest model tag (d<N>), its latest step."""
    folder = base_dir / CHECKPOINT_FOLDERS[source]
    tags = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not tags:
        raise ImportRefused(f"no nanochat checkpoints in {folder}")
    if model_tag is None:
        depths = [(int(m.group(1)), tag) for tag in tags if (m := re.fullmatch(r"d([0-9]+)", tag))]
        model_tag = max(depths)[1] if depths else tags[-1]
    steps = sorted(
        int(m.group(1)) for p in (folder / model_tag).glob("model_*.pt") if (m := MODEL_FILE.match(p.name))
    )
    if not steps:
        raise ImportRefused(f"no model_<step>.pt in {folder / model_tag}")
    if step is not None and step not in steps:
        raise ImportRefused(f"no step {step} in {folder / model_tag} (have: {steps})")
    return folder / model_tag, step if step is not None else steps[-1]


def recipe_of(meta: dict) -> dict[str, Any]:
    """The batch and LRs the nanochat run trained with, as our chat stages inherit them."""
    user = meta.get("user_config", {})
    batch = meta["total_batch_size"]
    return {
        "max_seq_len": meta["max_seq_len"],
        "device_batch_size": meta["device_batch_size"],
        "total_batch_size": batch,
        "lr_scale": math.sqrt(batch / REFERENCE_BATCH),
        "matrix_lr": user.get("matrix_lr", 0.02),
        "embedding_lr": user.get("embedding_lr", 0.3),
        "unembedding_lr": user.get("unembedding_lr", 0.008),
        "scalar_lr": user.get("scalar_lr", 0.5),
    }


def import_checkpoint(
    settings: TrainerSettings, base_dir: Path, run: str, stage: str, source: str = "base",
    model_tag: str | None = None, step: int | None = None,
) -> Path:  # fmt: skip
    """Write the nanochat checkpoint as runs/<run>/<stage>/step_<step>/ and its tokenizer as the run's.
    Returns the step folder."""
    folder, step = find_checkpoint(base_dir, source, model_tag, step)
    tokenizer = read_tokenizer(base_dir / "tokenizer")
    weights, config, meta = read_weights(folder, step)
    provenance = {"nanochat": str(folder), "step": step, "user_config": meta.get("user_config")}
    ours = {"val_bpb": meta.get("val_bpb"), "recipe": recipe_of(meta), "imported_from": provenance}
    return checkpoint.save_imported(settings.run_dir(run), stage, step, weights, config, tokenizer, ours)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Import a nanochat checkpoint as a stage of a run.")
    parser.add_argument("--from", dest="base_dir", type=Path, required=True, help="nanochat's base dir")
    parser.add_argument(
        "--source", choices=sorted(CHECKPOINT_FOLDERS), default="base", help="its stage (default: base)"
    )
    parser.add_argument("--model-tag", default=None, help="its model tag, e.g. d20 (default: the deepest)")
    parser.add_argument("--step", type=int, default=None, help="its step (default: the latest)")
    add_run_flag(parser)
    parser.add_argument(
        "--stage", choices=["base", "mid", "sft", "rl"], default=None, help="our stage (default: --source)"
    )
    args = parser.parse_args(argv)
    destination = import_checkpoint(
        TrainerSettings(), args.base_dir.expanduser(), args.run, args.stage or args.source, args.source,
        args.model_tag, args.step,
    )  # fmt: skip
    print0(f"imported as {destination}")
    return destination


if __name__ == "__main__":
    main()
