"""Job specs turn into exactly the trainer command lines a user would type, for every job kind."""

import argparse
import importlib

import pytest
from jobs.specs import (
    FLAGS_NOT_EXPOSED,
    JOB_SPEC,
    SPEC_CLASSES,
    STAGE_KINDS,
    Rendezvous,
    RunnerOptions,
    json_schemas,
)
from pydantic import BaseModel, ValidationError

from trainer.common import RUN_NAME_PATTERN, Bounded, run_name
from trainer.user_files import FILE_ID, file_id


def command(spec: dict, resume: bool = False) -> str:
    return " ".join(JOB_SPEC.validate_python(spec).command(resume=resume))


def test_tokenizer_job_passes_every_config_field_as_a_flag() -> None:
    spec = {"kind": "tokenizer", "run": "t", "config": {"vocab_size": 4096}}
    assert (
        command(spec)
        == "-m trainer.tok_train --run t --vocab-size 4096 --max-chars 2000000000 --doc-cap 10000"
    )


def test_base_train_job_passes_only_what_is_set_and_resume_as_a_bare_flag() -> None:
    spec = {"kind": "base_train", "run": "b", "config": {"depth": 4, "dtype": "bfloat16", "resume": True}}
    assert command(spec) == "-m trainer.base_train --run b --dtype bfloat16 --resume --depth 4"


def test_a_retry_adds_resume_to_training_programs_only() -> None:
    train = {"kind": "base_train", "run": "b", "config": {"depth": 4}}
    assert command(train, resume=True) == "-m trainer.base_train --run b --resume --depth 4"
    evaluation = {"kind": "base_eval", "run": "b", "config": {"max_per_task": 5}}
    assert command(evaluation, resume=True) == "-m trainer.base_eval --run b --max-per-task 5"


def test_false_is_passed_as_no_flag_where_the_program_defaults_to_on() -> None:
    spec = {
        "kind": "chat_sft",
        "run": "s",
        "config": {"load_optimizer": False, "compile": False, "resume": False},
    }
    assert command(spec) == "-m trainer.chat_sft --run s --no-compile --no-load-optimizer"


def test_several_processes_launch_through_torchrun_with_flags_after_a_separator() -> None:
    spec = {"kind": "base_train", "run": "b", "config": {"depth": 20, "nproc_per_node": 8, "max_retries": 5}}
    assert command(spec) == (
        "-m torch.distributed.run --standalone --nproc_per_node=8 -m trainer.base_train -- --run b --depth 20"
    )


def test_several_nodes_meet_in_the_rendezvous_each_node_is_given() -> None:
    spec = JOB_SPEC.validate_python(
        {"kind": "chat_sft", "run": "s", "config": {"nnodes": 2, "nproc_per_node": 8}}
    )
    first = Rendezvous("10.0.0.5:29400", "job1-1", is_host=True, local_address="10.0.0.5")
    assert " ".join(spec.command(resume=True, rendezvous=first)) == (
        "-m torch.distributed.run --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d"
        " --rdzv-endpoint=10.0.0.5:29400 --rdzv-id=job1-1 --rdzv-conf=is_host=true --local-addr=10.0.0.5"
        " -m trainer.chat_sft -- --run s --resume"
    )
    further = Rendezvous("10.0.0.5:29400", "job1-1", is_host=False, local_address="10.0.0.6")
    assert "--rdzv-conf=is_host=false --local-addr=10.0.0.6" in " ".join(spec.command(rendezvous=further))
    with pytest.raises(ValueError, match="needs their rendezvous"):
        spec.command()


@pytest.mark.parametrize(
    ("kind", "config"),
    [
        ("base_train", {"depth": 0}),
        ("base_train", {"nnodes": 0}),
        ("base_train", {"window_pattern": "SXL"}),
        ("base_train", {"dtype": "float8"}),
        ("base_train", {"nproc_per_node": 0}),
        ("base_train", {"lr": 1}),
        ("base_train", {"eval_every": -2}),
        ("base_train", {"softcap": 0}),
        ("base_train", {"weight_decay_horizon": "half"}),
        ("base_train", {"target_flops": 0}),
        ("mid_train", {"source": "rl"}),
        ("chat_rl", {"source": "base"}),
        ("chat_sft", {"source": "rl2"}),
        ("chat_rl", {"max_seq_len": 512}),  # not a chat_rl flag
        ("chat_eval", {"task_name": "GSM8K; rm -rf /"}),
        ("chat_sft", {"mixture": "/etc/passwd.yaml"}),
        ("chat_sft", {"mixture": "file-../../etc/passwd"}),
        ("base_train", {"corpus": "../shards"}),
        ("chat_rl", {"questions": "file-0123"}),
        ("validate_file", {}),  # which file
        ("chat_sft", {"mixture": "../../outside.yaml"}),
        ("mid_train", {"mixture": "mixtures/../../x.yaml"}),
        ("base_eval", {"eval": "core,everything"}),
        ("base_eval", {"core_tasks": "../core.yaml"}),
        ("tokenizer", {"max_retries": 100}),
        ("tokenizer", {"time_limit": 1}),
        ("pipeline", {"skip": list(STAGE_KINDS)}),
        ("pipeline", {"skip": ["warmup"]}),
        ("pipeline", {"recipe": "classic", "skip": ["mid_train", "chat_sft"]}),  # RL from the base model
        ("pipeline", {"mid_train": {"num_iterations": 5}}),  # the current recipe has no mid
        ("pipeline", {"recipe": "classic", "chat_sft": {"recipe": "current"}}),  # one recipe a pipeline
        ("pipeline", {"recipe": "nightly"}),
        ("chat_sft", {"recipe": "nightly"}),
        ("pipeline", {"skip": ["tokenizer", "base_train", "mid_train", "chat_sft", "chat_rl", "base_eval"]}),
        ("export", {"format": "gguf"}),
        ("export", {"stage": "tokenizer"}),
        ("export", {"step": -1}),
        ("export", {"out": "/tmp/x"}),  # exports go to the run's exports folder, where the API serves them
        ("import", {}),  # a source is required
        ("import", {"source": "/data/model"}),
        ("import", {"source": "../outside"}),
        ("import", {"source": "runs/../../outside"}),
        ("import", {"source": "-owner/name"}),
        ("import", {"source": "owner/na me"}),
        ("import", {"source": "owner/"}),
        ("import", {"source": "https://huggingface.co/owner/name"}),
        ("import", {"source": "x" * 401}),
        ("import", {"source": "o/n", "revision": "main; rm -rf /"}),
        ("import", {"source": "o/n", "revision": "-x"}),
        ("import", {"source": "o/n", "model_tag": "../d20"}),
        ("import", {"source": "o/n", "stage": "tokenizer"}),
    ],
)
def test_configs_are_bounded(kind: str, config: dict) -> None:
    with pytest.raises(ValidationError):
        JOB_SPEC.validate_python({"kind": kind, "run": "b", "config": config})


# Every flag of every kind set to a value other than its default, as a user might.
CORPUS = "file-0123456789abcdef01234567"  # an uploaded file's id
EVERY_FLAG = {
    "tokenizer": {"vocab_size": 4096, "max_chars": 20_000, "doc_cap": 500, "corpus": CORPUS},
    "base_train": {
        "depth": 4, "head_dim": 64, "aspect_ratio": 32, "n_kv_head": 1, "window_pattern": "SSL",
        "value_embeds": False, "smear": False, "backout": False, "layer_scalars": False, "softcap": 30.0,
        "rope_base": 10_000.0, "qk_scale": 1.0, "split_docs": True, "fp8": True, "corpus": CORPUS,
        "target_param_data_ratio": 8.0, "target_flops": 2.5e18, "matrix_lr": 0.03, "embedding_lr": 0.2,
        "unembedding_lr": 0.004, "scalar_lr": 0.4, "weight_decay": 0.1,
        "weight_decay_horizon": "trained", "warmup_steps": 5, "warmdown_ratio": 0.5, "final_lr_frac": 0.0,
        "eval_tokens": 4096, "core_metric_every": -1, "core_metric_max_per_task": 10, "sample_every": -1,
        "num_iterations": 3, "device_batch_size": 2, "eval_every": -1, "save_every": 7, "keep_checkpoints": 0,
        "resume": True, "seed": 3, "total_batch_size": 1024, "max_seq_len": 128, "compile": False,
        "dtype": "float32",
    },
    "mid_train": {
        "source": "base", "source_run": "other", "source_step": 5, "matrix_lr": 0.01, "embedding_lr": 0.25,
        "unembedding_lr": 0.005, "scalar_lr": 0.4, "init_lr_frac": 0.5, "warmup_ratio": 0.1,
        "warmdown_ratio": 0.3, "final_lr_frac": 0.1, "load_optimizer": False, "eval_tokens": 4096,
        "chatcore_every": 10, "chatcore_max_cat": 5, "chatcore_max_sample": -1, "num_iterations": 3,
        "mixture": "mixtures/mine.yaml",
        "device_batch_size": 2, "eval_every": 5, "save_every": -1, "keep_checkpoints": 2, "resume": True,
        "seed": 3, "total_batch_size": 1024, "max_seq_len": 128, "compile": True, "dtype": "bfloat16",
    },
    "chat_rl": {
        "source": "mid", "source_step": 4, "init_lr_frac": 0.1, "recipe": "classic", "num_epochs": 2,
        "examples_per_step": 4, "num_samples": 2, "max_new_tokens": 16, "temperature": 0.7, "top_k": 5,
        "eval_examples": 8, "num_iterations": 3, "device_batch_size": 2, "eval_every": 5, "save_every": 7,
        "questions": CORPUS,
        "keep_checkpoints": 2, "resume": True, "seed": 3, "dtype": "float32", "source_run": "other",
        "matrix_lr": 0.01, "embedding_lr": 0.25, "unembedding_lr": 0.005, "scalar_lr": 0.4,
    },
    "base_eval": {
        "step": 5, "eval": "core,bpb", "max_per_task": 5, "core_tasks": "core_offline.yaml",
        "split_tokens": 4096, "device_batch_size": 4, "dtype": "bfloat16",
    },
    "chat_eval": {
        "source": "rl", "step": 5, "task_name": "ARC-Easy|GSM8K", "max_problems": 5, "batch_size": 4,
        "num_samples": 2, "max_new_tokens": 16, "temperature": 0.5, "top_k": 7, "dtype": "float32",
    },
}  # fmt: skip
EVERY_FLAG["export"] = {"stage": "rl", "step": 5, "format": "hf"}
EVERY_FLAG["import"] = {
    "source": "runs/other/exports/other-sft-000005", "revision": "v1.0", "stage": "mid", "model_tag": "d20",
    "step": 5,
}  # fmt: skip
# What a config cannot do without, for the kinds that require a field.
REQUIRED = {"import": {"source": "owner/name"}, "validate_file": {"file": CORPUS}}
EVERY_FLAG["validate_file"] = {"file": CORPUS, "val_fraction": 0.2, "max_tokens": 512}
EVERY_FLAG["chat_sft"] = {
    **EVERY_FLAG["mid_train"], "source": "mid", "recipe": "classic", "examples_per_step": 16
}  # fmt: skip


def program_parser(kind: str) -> argparse.ArgumentParser:
    if kind in ("mid_train", "chat_sft"):
        return importlib.import_module("trainer.supervised").build_parser(kind)
    program = SPEC_CLASSES[kind].program
    return importlib.import_module(program).parser


def program_flags(kind: str) -> dict[str, argparse.Action]:
    """The program's flags by name, but --help and those a job does not set."""
    actions = program_parser(kind)._actions
    return {a.dest: a for a in actions if a.dest != "help" and a.dest not in FLAGS_NOT_EXPOSED}


def config_class(kind: str) -> type[BaseModel]:
    return SPEC_CLASSES[kind].model_fields["config"].annotation


def accepted(field_schema: dict) -> dict:
    """A field's JSON Schema for the values it takes besides null (unset: the program's default)."""
    (values,) = [
        option for option in field_schema.get("anyOf", [field_schema]) if option.get("type") != "null"
    ]
    return values


@pytest.mark.parametrize("kind", sorted(EVERY_FLAG))
def test_every_flag_of_the_program_is_a_config_field_of_its_type_bounds_and_default(kind: str) -> None:
    flags, config = program_flags(kind), config_class(kind)
    fields = config.model_json_schema()["properties"]
    assert set(flags) == set(fields) - RunnerOptions.RUNNER_FIELDS
    for name, action in flags.items():
        field = accepted(fields[name])
        if isinstance(action, argparse._StoreTrueAction | argparse.BooleanOptionalAction):
            assert field["type"] == "boolean", name
        elif action.choices is not None:  # one choice is a JSON Schema const
            assert field.get("enum", [field.get("const")]) == list(action.choices), name
        elif isinstance(action.type, Bounded):
            assert field["type"] == {int: "integer", float: "number"}[action.type.kind], name
            program_bounds = (action.type.minimum, action.type.maximum, action.type.exclusive_minimum, None)
            bounds = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
            assert tuple(field.get(bound) for bound in bounds) == program_bounds, name
        elif action.type is run_name:
            assert field["pattern"] == RUN_NAME_PATTERN.pattern, name
        elif action.type is file_id:
            assert field["pattern"] == FILE_ID.pattern, name
        else:
            assert action.type is None and field["type"] == "string", (
                f"{name} takes an unbounded {action.type}"
            )
        if not action.required and action.default is not None:
            config.model_validate({**REQUIRED.get(kind, {}), name: action.default})  # a value the API takes


@pytest.mark.parametrize("kind", sorted(EVERY_FLAG))
def test_a_switch_set_either_way_reaches_the_program(kind: str) -> None:
    """False goes as --no-flag where the program defaults to on, and as nothing to a store_true flag."""
    fields = config_class(kind).model_json_schema()["properties"]
    switches = [name for name, field in fields.items() if accepted(field).get("type") == "boolean"]
    parser = program_parser(kind)
    for name in switches:
        for value in (True, False):
            config = {**REQUIRED.get(kind, {}), name: value}
            spec = JOB_SPEC.validate_python({"kind": kind, "run": "r", "config": config})
            assert getattr(parser.parse_args(spec.arguments()), name) is value, (name, value)


@pytest.mark.parametrize("kind", sorted(EVERY_FLAG))
def test_a_spec_with_every_field_set_parses_back_through_the_program_to_the_same_values(kind: str) -> None:
    spec = JOB_SPEC.validate_python({"kind": kind, "run": "r", "config": EVERY_FLAG[kind]})
    runner_fields = RunnerOptions.RUNNER_FIELDS
    assert set(EVERY_FLAG[kind]) == set(type(spec.config).model_fields) - runner_fields, "a field is untested"
    parsed = vars(program_parser(kind).parse_args(spec.arguments()))
    assert parsed["run"] == "r"
    for name, value in EVERY_FLAG[kind].items():
        assert parsed[name] == value, name


def test_a_pipeline_chains_the_stages_each_from_the_last_one_that_runs() -> None:
    spec = JOB_SPEC.validate_python(
        {"kind": "pipeline", "run": "p", "config": {"skip": ["chat_eval"], "base_train": {"depth": 2}}}
    )
    stages = spec.stages()  # the current recipe: no mid, no RL unless asked for
    assert [s.kind for s in stages] == ["tokenizer", "base_train", "chat_sft", "base_eval"]
    assert {s.run for s in stages} == {"p"}
    assert stages[1].config.depth == 2
    assert stages[2].config.source == "base" and stages[2].config.recipe == "current"
    assert "--recipe current" in " ".join(stages[2].command())


def test_the_classic_pipeline_is_the_seeds_four_stages_and_rl_is_optional_in_either() -> None:
    def kinds(config: dict) -> list[str]:
        spec = JOB_SPEC.validate_python({"kind": "pipeline", "run": "p", "config": config})
        return [s.kind for s in spec.stages()]

    classic = JOB_SPEC.validate_python(
        {"kind": "pipeline", "run": "p", "config": {"recipe": "classic"}}
    ).stages()
    assert [s.kind for s in classic] == [
        "tokenizer", "base_train", "mid_train", "chat_sft", "chat_rl", "base_eval", "chat_eval"
    ]  # fmt: skip
    sft, rl, chat_eval = classic[3], classic[4], classic[6]
    assert (sft.config.source, sft.config.recipe) == ("mid", "classic")
    assert (rl.config.source, rl.config.recipe) == ("sft", "classic") and chat_eval.config.source == "rl"
    assert "chat_rl" in kinds({"rl": True}) and "chat_rl" not in kinds({"recipe": "classic", "rl": False})
    assert kinds({"recipe": "classic", "skip": ["mid_train"]})[2:4] == ["chat_sft", "chat_rl"]


def test_the_schema_names_every_kind_with_defaults_and_bounds() -> None:
    schemas = json_schemas()
    assert set(schemas) == {*EVERY_FLAG, "pipeline"}
    base = schemas["base_train"]["$defs"]["BaseTrainConfig"]["properties"]
    assert base["depth"]["default"] == 12 and base["depth"]["minimum"] == 1 and base["depth"]["maximum"] == 64
    assert base["max_retries"]["default"] == 2


def test_an_import_writes_the_stage_its_config_names_and_the_runs_tokenizer() -> None:
    spec = JOB_SPEC.validate_python(
        {"kind": "import", "run": "i", "config": {"source": "o/n", "stage": "mid"}}
    )
    assert spec.stage == "mid" and spec.writes == {"mid", "tokenizer"}
    assert spec.report_section == "model_import" and not spec.resumable
    assert " ".join(spec.command(resume=True)) == "-m trainer.model_import --run i --source o/n --stage mid"


def test_an_export_writes_only_the_runs_exports_folder_on_the_cpu() -> None:
    spec = JOB_SPEC.validate_python({"kind": "export", "run": "e", "config": {"step": 420}})
    assert spec.stage == "exports" and spec.writes == {"exports"}  # training the same run may go on
    assert spec.nproc_per_node == 0  # the worker then gives it no GPU: the model server keeps them
    assert " ".join(spec.command()) == "-m trainer.export --run e --stage sft --step 420 --format hf"
    assert JOB_SPEC.validate_python({"kind": "chat_sft", "run": "e"}).writes == {"sft"}
    assert JOB_SPEC.validate_python({"kind": "chat_eval", "run": "e"}).writes == set()


def test_a_file_validation_writes_no_run_folder_and_runs_on_the_cpu() -> None:
    spec = JOB_SPEC.validate_python({"kind": "validate_file", "run": "tok", "config": {"file": CORPUS}})
    assert spec.writes == set() and spec.nproc_per_node == 0  # the model server keeps its GPUs
    assert " ".join(spec.command(resume=True)) == (
        f"-m trainer.validate_file --run tok --file {CORPUS} --val-fraction 0.05 --max-tokens 2048"
    )
