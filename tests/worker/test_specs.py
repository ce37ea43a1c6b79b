"""Job specs turn into exactly the trainer command lines a user would type."""

import pytest
from pydantic import ValidationError

from worker.specs import JOB_SPEC


def command(spec: dict) -> str:
    return " ".join(JOB_SPEC.validate_python(spec).command())


def test_tokenizer_job_passes_every_config_field_as_a_flag() -> None:
    spec = {"kind": "tokenizer", "run": "t", "config": {"vocab_size": 4096}}
    assert (
        command(spec)
        == "-m trainer.tok_train --run t --vocab-size 4096 --max-chars 2000000000 --doc-cap 10000"
    )


def test_base_train_job_passes_only_what_is_set_and_resume_as_a_bare_flag() -> None:
    spec = {"kind": "base_train", "run": "b", "config": {"depth": 4, "dtype": "bfloat16", "resume": True}}
    assert command(spec) == "-m trainer.base_train --run b --depth 4 --resume --dtype bfloat16"


def test_several_processes_launch_through_torchrun_with_flags_after_a_separator() -> None:
    spec = {"kind": "base_train", "run": "b", "config": {"depth": 20, "nproc_per_node": 8}}
    assert command(spec) == (
        "-m torch.distributed.run --standalone --nproc_per_node=8 -m trainer.base_train -- --run b --depth 20"
    )


@pytest.mark.parametrize(
    "config", [{"depth": 0}, {"window_pattern": "SXL"}, {"dtype": "float8"}, {"nproc_per_node": 0}, {"lr": 1}]
)
def test_base_train_config_is_bounded(config: dict) -> None:
    with pytest.raises(ValidationError):
        JOB_SPEC.validate_python({"kind": "base_train", "run": "b", "config": config})
