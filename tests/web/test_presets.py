"""The job presets the UI offers (and `make demo` and speedrun.sh submit) are specs the API accepts, and
the recipes they say they are."""

import json

import pytest
from jobs.specs import JOB_SPEC

from support import ROOT

PRESETS = json.loads((ROOT / "services/web/web/static/presets.json").read_text())


def stages(name: str) -> dict:
    """The preset's stages as the API would queue them, by kind."""
    return {stage.kind: stage for stage in JOB_SPEC.validate_python(PRESETS[name]["spec"]).stages()}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_job_spec(name: str) -> None:
    spec = JOB_SPEC.validate_python(PRESETS[name]["spec"])
    assert spec.kind == "pipeline" and PRESETS[name]["about"]


def test_the_demo_pipeline_ends_with_a_chat_model() -> None:
    """make demo hands the user a chat page once the SFT stage is done."""
    assert list(stages("tiny CPU demo pipeline")) == ["tokenizer", "base_train", "chat_sft"]


def test_the_speedrun_preset_is_the_references_record_run() -> None:
    """nanochat 92d63d4 runs/speedrun.sh: base d24 at 8 tokens per parameter in fp8 on 8 GPUs, SFT from
    base."""
    run = stages("d24 8×GPU speedrun")
    assert list(run) == ["tokenizer", "base_train", "chat_sft", "base_eval", "chat_eval"]
    base = run["base_train"].config
    assert (base.depth, base.target_param_data_ratio, base.fp8, base.nproc_per_node) == (24, 8, True, 8)
    assert (run["chat_sft"].config.recipe, run["chat_sft"].config.source) == ("current", "base")
    assert "d24 8×GPU speedrun" in (ROOT / "speedrun.sh").read_text()


def test_the_classic_preset_runs_the_seeds_four_stages() -> None:
    run = stages("d20 classic 8×GPU")
    training = [kind for kind in run if kind in ("base_train", "mid_train", "chat_sft", "chat_rl")]
    assert training == ["base_train", "mid_train", "chat_sft", "chat_rl"]
    assert run["base_train"].config.target_param_data_ratio == 20
    assert run["mid_train"].config.total_batch_size == 2**19  # the reference mid's own batch
