"""
Export a checkpoint as a Hugging Face model folder that transformers loads, with its tokenizer, chat
template, generation config and a model card; and a tarball of it (what the API's download serves):

    python -m trainer.export --run demo --stage sft                # → runs/demo/exports/demo-sft-000420/
    python -m trainer.export --run demo --stage base --step 800 --out ~/my-model

    AutoModelForCausalLM.from_pretrained(folder)                          # built-in NanoChat architecture
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)  # ours (see below)
    AutoTokenizer.from_pretrained(folder)

Two architectures, chosen by what the model computes:
- transformers' own `NanoChatForCausalLM` (the older nanochat) when the model is exactly that: full
  attention, no value embeddings, smear, backout or per-layer scalars, QK scale 1 (base_train
  `--window-pattern L --no-value-embeds --no-smear --no-backout --no-layer-scalars --qk-scale 1`). No
  remote code; any tool that loads built-in architectures loads it. Within the training context its
  logits are ours; past it, ours keeps the window of the context length and the built-in one sees all.
- otherwise our modeling_nanochat_stack.py ships in the folder (`trust_remote_code=True`).
Weights are written in fp32 (the checkpoint's masters), vocabulary rows past the tokenizer's dropped for
the built-in class (ours crops its logits to them too). The folder and the tarball appear complete or
not at all.
"""

import argparse
import json
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from trainer import checkpoint, hf_tokenizer, report
from trainer.common import CHECKPOINT_STEP, add_run_flag, make_temp_dir, print0, replace_dir
from trainer.gpt import GPTConfig
from trainer.report import STAGES
from trainer.settings import TrainerSettings
from trainer.tokenizer import Tokenizer

REMOTE_CODE = Path(__file__).with_name("modeling_nanochat_stack.py")
# Our block's linear layers → NanoChatForCausalLM's names for them (model_import reads them back).
BUILTIN_PARTS = {
    "attn.c_q": "self_attn.q_proj",
    "attn.c_k": "self_attn.k_proj",
    "attn.c_v": "self_attn.v_proj",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def model_id(run: str, stage: str, step: int) -> str:
    """The API's and the inference server's id of a checkpoint (jobs.models.Checkpoint.id)."""
    return f"{run}-{stage}-{step:06d}"


# The GPTConfig switches of the architecture transformers' built-in NanoChat class computes: a model
# trained with --window-pattern L --no-value-embeds --no-smear --no-backout --no-layer-scalars --qk-scale 1.
BUILTIN_ARCHITECTURE = {
    "window_pattern": "L",
    "value_embeds": False,
    "smear": False,
    "backout": False,
    "layer_scalars": False,
    "qk_scale": 1.0,
}


def builtin_compatible(config: GPTConfig) -> bool:
    """Whether transformers' NanoChatForCausalLM computes exactly this model (within its context)."""
    return (
        not (config.value_embeds or config.smear or config.backout or config.layer_scalars)
        and config.qk_scale == 1.0
        and all(window >= config.sequence_len for window in config.window_sizes())
    )


def token_ids(tokenizer: Tokenizer) -> dict[str, Any]:
    """BOS starts every document and prompt; a reply ends at <|assistant_end|> (or a new document)."""
    bos, end = tokenizer.bos_token_id, tokenizer.encode_special("<|assistant_end|>")
    return {"bos_token_id": bos, "eos_token_id": [end, bos], "pad_token_id": end}


def builtin_weights(weights: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our names → NanoChatForCausalLM's, the vocabulary cut to the tokenizer's."""
    renamed = {
        "model.embed_tokens.weight": weights["wte.weight"][: config.vocab_size],
        "lm_head.weight": weights["lm_head.weight"][: config.vocab_size],
    }
    for layer in range(config.n_layer):
        for ours, theirs in BUILTIN_PARTS.items():
            renamed[f"model.layers.{layer}.{theirs}.weight"] = weights[f"blocks.{layer}.{ours}.weight"]
    assert len(renamed) == len(weights), "a weight has no place in the built-in class"
    return renamed


def builtin_config(config: GPTConfig, ids: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        # torch's rms_norm default (ours): the machine epsilon of fp32
        "rms_norm_eps": config.norm_eps if config.norm_eps is not None else torch.finfo(torch.float32).eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "final_logit_softcapping": config.softcap,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "dtype": "float32",
        **ids,
    }


def remote_code_config(config: GPTConfig, ids: dict[str, Any]) -> dict[str, Any]:
    module = REMOTE_CODE.stem
    return {
        "architectures": ["NanoChatStackForCausalLM"],
        "model_type": "nanochat_stack",
        "auto_map": {
            "AutoConfig": f"{module}.NanoChatStackConfig",
            "AutoModelForCausalLM": f"{module}.NanoChatStackForCausalLM",
        },
        **config.to_dict(),
        "tie_word_embeddings": False,
        "dtype": "float32",
        **ids,
    }


def model_card(name: str, meta: dict[str, Any], architecture: str, scores: dict[str, float]) -> str:
    """README.md: what the model is, how to load it, its numbers and recipe."""
    remote = architecture == "NanoChatStackForCausalLM"
    load = ", trust_remote_code=True" if remote else ""
    config = meta["model_config"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [nanochat, nanochat-stack]",
        "---",
        f"# {name}",
        "",
        f"A {config['n_layer']}-layer, {config['n_embd']}-wide GPT trained with nanochat-stack "
        f"(step {meta['step']}), exported as `{architecture}`"
        + (" with its modeling code in this folder." if remote else ", transformers' built-in class."),
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'model = AutoModelForCausalLM.from_pretrained("{name}"{load})',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        'messages = [{"role": "user", "content": "Hi!"}]',
        "prompt = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ")",
        "reply = model.generate(**prompt, max_new_tokens=64, do_sample=False)",
        'print(tokenizer.decode(reply[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        "## Numbers",
        "",
    ]
    numbers = {"val_bpb": meta.get("val_bpb"), **scores}
    lines += [f"- {key}: {value:.4f}" for key, value in numbers.items() if isinstance(value, int | float)]
    lines += ["", "## Recipe", "", "```json", json.dumps(meta.get("recipe"), indent=2), "```", ""]
    lines += ["Model config:", "", "```json", json.dumps(config, indent=2), "```", ""]
    return "\n".join(lines)


def write_folder(
    folder: Path, weights: dict[str, torch.Tensor], meta: dict[str, Any], tokenizer: Tokenizer,
    scores: dict[str, float], name: str,
) -> str:  # fmt: skip
    """Fill `folder` with the export; returns the architecture written."""
    config = GPTConfig(**meta["model_config"])
    ids = token_ids(tokenizer)
    provenance = {"nanochat_stack": {"model": name, "step": meta["step"], "recipe": meta.get("recipe")}}
    if builtin_compatible(config):
        architecture, hf_config = "NanoChatForCausalLM", builtin_config(config, ids)
        weights = builtin_weights(weights, config)
    else:
        architecture, hf_config = "NanoChatStackForCausalLM", remote_code_config(config, ids)
        shutil.copyfile(REMOTE_CODE, folder / REMOTE_CODE.name)
    tensors = {key: tensor.float().contiguous() for key, tensor in weights.items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**hf_config, **provenance}, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
    hf_tokenizer.write(tokenizer, folder, config.sequence_len)
    (folder / "README.md").write_text(model_card(name, meta, architecture, scores))
    return architecture


def write_tarball(folder: Path, tarball: Path) -> int:
    """An uncompressed tar of `folder` (weights barely compress), renamed into place when complete."""
    tmp = tarball.with_name(f".{tarball.name}.tmp")
    with tarfile.open(tmp, "w") as tar:
        tar.add(folder, arcname=tarball.name.removesuffix(".tar"))
    tmp.replace(tarball)
    return tarball.stat().st_size


def export(settings: TrainerSettings, run: str, stage: str, step: int | None, out: Path | None) -> dict:
    """Write the export folder (and beside it its tarball); returns the report section."""
    started = time.time()
    run_dir = settings.run_dir(run)
    step = checkpoint.resolve_step(run_dir / stage, step)
    name = model_id(run, stage, step)
    meta = checkpoint.read_meta(run_dir / stage, step)
    weights = load_file(checkpoint.step_dir(run_dir / stage, step) / "model.safetensors")
    tokenizer = Tokenizer.load(run_dir / "tokenizer")
    scores = report.stage_scores(report.read_sections(report.report_dir(settings, run))).get(stage, {})
    destination = (out or run_dir / "exports" / name).expanduser()
    tmp = make_temp_dir(destination)
    try:
        architecture = write_folder(tmp, weights, meta, tokenizer, scores, name)
        replace_dir(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tarball = destination.with_name(f"{destination.name}.tar")
    size = write_tarball(destination, tarball)
    print0(f"exported {name} as {architecture} to {destination} ({size / 1e6:.1f} MB as {tarball.name})")
    return {
        "model": name,
        "format": "hf",
        "architecture": architecture,
        "remote_code": architecture == "NanoChatStackForCausalLM",
        "path": str(destination),
        "tarball": str(tarball),
        "tarball_bytes": size,
        "wall_seconds": time.time() - started,
    }


parser = argparse.ArgumentParser(description="Export a checkpoint for Hugging Face transformers.")
add_run_flag(parser)
parser.add_argument("--stage", choices=STAGES, default="sft", help="which stage's model (default: sft)")
parser.add_argument("--step", type=CHECKPOINT_STEP, default=None, help="its checkpoint (default: latest)")
parser.add_argument("--format", choices=["hf"], default="hf", help="hf: a transformers model folder")
parser.add_argument(
    "--out", type=Path, default=None, help="folder to write (default: runs/RUN/exports/<model id>/)"
)


def main(argv: list[str] | None = None) -> dict:
    args = parser.parse_args(argv)
    settings = TrainerSettings()
    section = export(settings, args.run, args.stage, args.step, args.out)
    report.write_section(settings, args.run, "export", section, vars(args) | {"out": str(args.out)})
    return section


if __name__ == "__main__":
    main()
