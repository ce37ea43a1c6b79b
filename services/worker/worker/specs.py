"""
What a client may ask for: one pydantic model per job kind, unknown fields forbidden and every value
bounded, so a bad request is refused with the field's name before anything reaches the queue. A spec
also knows the trainer program that runs it; each config field is that program's flag of the same name.
"""

from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

# Same rule as the trainer's --run: a run name is one safe path component.
RunName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="run folder name")]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizerConfig(StrictModel):
    vocab_size: int = Field(
        default=32768, ge=265, le=2**17, description="vocab incl. 256 byte tokens and the 9 special tokens"
    )
    max_chars: int = Field(
        default=2_000_000_000, ge=10_000, le=100_000_000_000, description="characters of text to train on"
    )
    doc_cap: int = Field(
        default=10_000, ge=100, le=1_000_000, description="crop each document to this length"
    )


class BaseTrainConfig(StrictModel):
    """The base_train flags a job may set; unset ones take the program's defaults (derived from depth)."""

    depth: int = Field(default=12, ge=1, le=64, description="transformer layers: the one dial")
    head_dim: int | None = Field(default=None, ge=16, le=256, description="channels per attention head")
    window_pattern: str | None = Field(default=None, pattern=r"^[SLsl]{1,16}$", description="e.g. SSSL")
    max_seq_len: int | None = Field(default=None, ge=16, le=65536)
    device_batch_size: int | None = Field(default=None, ge=1, le=4096)
    total_batch_size: int | None = Field(default=None, ge=16, le=2**26)
    num_iterations: int | None = Field(default=None, ge=1, le=10_000_000)
    target_param_data_ratio: float | None = Field(default=None, gt=0, le=1000)
    eval_every: int | None = Field(default=None, ge=0)
    eval_tokens: int | None = Field(default=None, ge=1, le=2**34)
    core_metric_every: int | None = Field(
        default=None, ge=-1, description="steps between CORE evals, -1: off"
    )
    core_metric_max_per_task: int | None = Field(default=None, ge=-1, le=1_000_000)
    sample_every: int | None = Field(default=None, ge=0)
    save_every: int | None = Field(default=None, ge=0)
    resume: bool = Field(default=False, description="continue from the run's latest checkpoint")
    dtype: Literal["bfloat16", "float16", "float32"] | None = None
    nproc_per_node: int = Field(
        default=1,
        ge=1,
        le=64,
        description="processes (GPUs) on this worker's machine, launched with torchrun",
    )


class JobSpec(StrictModel):
    """Fields every job kind has; subclasses add `kind`, `config` and the program that runs them."""

    program: ClassVar[str]  # the trainer module run as `python -m <program>`
    report_section: ClassVar[str]  # runs/<run>/report/<section>.json becomes the job's result

    run: RunName = "default"

    def arguments(self) -> list[str]:
        """The program's flags: --run plus one --flag per config field that is set (booleans bare)."""
        args = ["--run", self.run]
        for name, value in self.config.model_dump(exclude={"nproc_per_node"}).items():
            flag = f"--{name.replace('_', '-')}"
            if value is True:
                args.append(flag)
            elif value is not None and value is not False:
                args += [flag, str(value)]
        return args

    def command(self) -> list[str]:
        """What follows `python`: `-m <program> <flags>`, through torchrun for several processes.
        torchrun needs `--` before the program's flags: it would take `--run` for its own `--run-path`."""
        processes = getattr(self.config, "nproc_per_node", 1)
        if processes > 1:
            torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
            return [*torchrun, "-m", self.program, "--", *self.arguments()]
        return ["-m", self.program, *self.arguments()]


class TokenizerJob(JobSpec):
    program: ClassVar[str] = "trainer.tok_train"
    report_section: ClassVar[str] = "tok_train"

    kind: Literal["tokenizer"]
    config: TokenizerConfig = TokenizerConfig()


class BaseTrainJob(JobSpec):
    program: ClassVar[str] = "trainer.base_train"
    report_section: ClassVar[str] = "base_train"

    kind: Literal["base_train"]
    config: BaseTrainConfig = BaseTrainConfig()


AnyJobSpec = Annotated[TokenizerJob | BaseTrainJob, Field(discriminator="kind")]
JOB_SPEC = TypeAdapter(AnyJobSpec)
