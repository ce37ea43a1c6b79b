"""The job presets the UI offers (and `make demo` submits) are specs the API accepts."""

import json

import pytest
from jobs.specs import JOB_SPEC

from support import ROOT

PRESETS = json.loads((ROOT / "services/web/web/static/presets.json").read_text())


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_a_valid_job_spec(name: str) -> None:
    spec = JOB_SPEC.validate_python(PRESETS[name]["spec"])
    assert spec.kind == "pipeline" and PRESETS[name]["about"]


def test_the_demo_pipeline_ends_with_a_chat_model() -> None:
    """make demo hands the user a chat page once the SFT stage is done."""
    config = PRESETS["tiny CPU demo pipeline"]["spec"]["config"]
    assert "chat_sft" not in config["skip"] and "chat_sft" in config
