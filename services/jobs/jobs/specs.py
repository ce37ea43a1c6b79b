"""
What a client may ask for: one pydantic model per job kind, unknown fields forbidden and every value
bounded, so a bad request is refused with the field's name before anything reaches the queue. A spec
also knows the trainer program that runs it; each config field is that program's flag of the same name,
except the runner's own options (retries, time limit, processes, nodes), which never reach the program.
"""

from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

# Same rule as the trainer's --run: a run name is one safe path component.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
RunName = Annotated[str, Field(pattern=NAME_PATTERN, description="run folder name")]
Dtype = Literal["bfloat16", "float16", "float32"]
ChatStage = Literal["mid", "sft", "rl"]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunnerOptions(StrictModel):
    """How the worker runs the program; not passed to it."""

    RUNNER_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"max_retries", "time_limit", "nproc_per_node", "nnodes"}
    )

    max_retries: int = Field(
        default=2,
        ge=0,
        le=20,
        description="re-runs after the worker is lost (each resumes from a checkpoint)",
    )
    time_limit: int | None = Field(
        default=None, ge=10, le=30 * 24 * 3600, description="seconds before the job is stopped (checkpointed)"
    )


class ModelProgramOptions(RunnerOptions):
    nproc_per_node: int = Field(
        default=1,
        ge=1,
        le=64,
        description="processes (GPUs) on this worker's machine, launched with torchrun",
    )
    nnodes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="workers (machines) that run it together, each with nproc_per_node processes; they "
        "meet in torchrun's c10d rendezvous and need the runs folder on shared storage",
    )
    dtype: Dtype | None = Field(
        default=None, description="compute dtype (default: bf16 on recent GPUs, else fp32)"
    )


class StepFlags(ModelProgramOptions):
    """Flags of every training program (base, mid, SFT, RL)."""

    num_iterations: int | None = Field(default=None, ge=1, le=10_000_000, description="optimizer steps")
    device_batch_size: int | None = Field(default=None, ge=1, le=4096, description="rows per forward pass")
    eval_every: int | None = Field(default=None, ge=0, le=10_000_000, description="steps between evals")
    save_every: int | None = Field(default=None, ge=0, le=10_000_000, description="steps between checkpoints")
    keep_checkpoints: int | None = Field(default=None, ge=1, le=1000, description="checkpoints kept")
    resume: bool = Field(default=False, description="continue from the run's latest checkpoint")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)


class TrainingFlags(StepFlags):
    """Flags of the programs that train on token batches (base, mid, SFT)."""

    total_batch_size: int | None = Field(
        default=None, ge=16, le=2**26, description="tokens per optimizer step"
    )
    max_seq_len: int | None = Field(default=None, ge=16, le=65536, description="tokens per sequence")
    compile: bool | None = Field(default=None, description="torch.compile (default: on for CUDA)")


class ChatSourceFlags(StrictModel):
    """Where a chat stage starts from, and its LRs (default: the source run's)."""

    source: ChatStage | Literal["base"] | None = Field(default=None, description="stage to start from")
    source_run: RunName | None = Field(default=None, description="run to start from (default: this run)")
    source_step: int | None = Field(default=None, ge=0, description="its checkpoint (default: latest)")
    matrix_lr: float | None = Field(default=None, gt=0, le=10)
    embedding_lr: float | None = Field(default=None, gt=0, le=10)
    unembedding_lr: float | None = Field(default=None, gt=0, le=10)
    scalar_lr: float | None = Field(default=None, gt=0, le=10)
    init_lr_frac: float | None = Field(default=None, gt=0, le=10, description="LR × the source's")


class TokenizerConfig(RunnerOptions):
    vocab_size: int = Field(
        default=32768, ge=265, le=2**17, description="vocab incl. 256 byte tokens and the 9 special tokens"
    )
    max_chars: int = Field(
        default=2_000_000_000, ge=10_000, le=100_000_000_000, description="characters of text to train on"
    )
    doc_cap: int = Field(
        default=10_000, ge=100, le=1_000_000, description="crop each document to this length"
    )


class BaseTrainConfig(TrainingFlags):
    """The base_train flags a job may set; unset ones take the program's defaults (derived from depth)."""

    depth: int = Field(default=12, ge=1, le=64, description="transformer layers: the one dial")
    head_dim: int | None = Field(default=None, ge=16, le=256, description="channels per attention head")
    window_pattern: str | None = Field(default=None, pattern=r"^[SLsl]{1,16}$", description="e.g. SSSL")
    target_param_data_ratio: float | None = Field(
        default=None, gt=0, le=1000, description="tokens per parameter"
    )
    eval_tokens: int | None = Field(default=None, ge=1, le=2**34, description="val tokens per bpb eval")
    core_metric_every: int | None = Field(
        default=None, ge=-1, description="steps between CORE evals, -1: off"
    )
    core_metric_max_per_task: int | None = Field(default=None, ge=-1, le=1_000_000)
    sample_every: int | None = Field(default=None, ge=0)


class SupervisedConfig(TrainingFlags, ChatSourceFlags):
    """mid_train and chat_sft."""

    mixture: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._/-]{1,200}\.ya?ml$",
        description="task mixture file, relative to the base dir (default: the stage's own)",
    )

    @field_validator("mixture")
    @classmethod
    def inside_the_base_dir(cls, path: str | None) -> str | None:
        if path is not None and (path.startswith("/") or ".." in path.split("/")):
            raise ValueError("must be a path inside the base dir: relative, without '..'")
        return path

    warmup_ratio: float | None = Field(default=None, ge=0, le=1)
    warmdown_ratio: float | None = Field(default=None, ge=0, le=1)
    final_lr_frac: float | None = Field(default=None, ge=0, le=1)
    load_optimizer: bool | None = Field(default=None, description="start from the source's momentum")
    eval_tokens: int | None = Field(default=None, ge=1, le=2**34, description="val tokens per bpb eval")
    chatcore_every: int | None = Field(
        default=None, ge=-1, description="steps between ChatCORE evals, -1: off"
    )
    chatcore_max_cat: int | None = Field(default=None, ge=-1, le=1_000_000)
    chatcore_max_sample: int | None = Field(default=None, ge=1, le=1_000_000)


class ChatRLConfig(StepFlags, ChatSourceFlags):
    num_epochs: int | None = Field(default=None, ge=1, le=1000, description="passes over GSM8K train")
    examples_per_step: int | None = Field(default=None, ge=1, le=4096)
    num_samples: int | None = Field(default=None, ge=1, le=1024, description="replies per question")
    max_new_tokens: int | None = Field(default=None, ge=1, le=65536)
    temperature: float | None = Field(default=None, ge=0, le=10)
    top_k: int | None = Field(default=None, ge=1, le=1_000_000)
    eval_examples: int | None = Field(default=None, ge=1, le=100_000)


class BaseEvalConfig(ModelProgramOptions):
    step: int | None = Field(default=None, ge=0, description="checkpoint (default: latest)")
    eval: str | None = Field(default=None, pattern=r"^(core|bpb|sample)(,(core|bpb|sample))*$")
    max_per_task: int | None = Field(default=None, ge=-1, le=1_000_000, description="CORE examples per task")
    split_tokens: int | None = Field(default=None, ge=1, le=2**34, description="tokens per split for bpb")
    device_batch_size: int | None = Field(default=None, ge=1, le=4096)


class ChatEvalConfig(ModelProgramOptions):
    source: ChatStage = Field(default="sft", description="which stage's model")
    step: int | None = Field(default=None, ge=0, description="checkpoint (default: latest)")
    task_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]+(\|[A-Za-z0-9-]+)*$")
    max_problems: int | None = Field(default=None, ge=1, le=1_000_000, description="first N per task")
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    num_samples: int | None = Field(default=None, ge=1, le=1024)
    max_new_tokens: int | None = Field(default=None, ge=1, le=65536)
    temperature: float | None = Field(default=None, ge=0, le=10)
    top_k: int | None = Field(default=None, ge=1, le=1_000_000)


class JobSpec(StrictModel):
    """Fields every job kind has; subclasses add `kind`, `config` and the program that runs them."""

    program: ClassVar[str]  # the trainer module run as `python -m <program>`
    stage: ClassVar[str | None] = None  # the run folder it writes checkpoints to (one writer at a time)

    run: RunName = "default"

    @property
    def report_section(self) -> str:
        """runs/<run>/report/<section>.json becomes the job's result."""
        return self.program.removeprefix("trainer.")

    @property
    def resumable(self) -> bool:
        return "resume" in type(self.config).model_fields

    def arguments(self, resume: bool = False) -> list[str]:
        """--run plus one --flag per config field that is set (True bare, False as --no-flag unless
        False is the default); `resume` adds --resume (a retry continues from the latest checkpoint)."""
        args = ["--run", self.run]
        fields = type(self.config).model_fields
        values = self.config.model_dump(exclude=RunnerOptions.RUNNER_FIELDS)
        if resume and self.resumable:
            values["resume"] = True
        for name, value in values.items():
            flag = name.replace("_", "-")
            if value is True:
                args.append(f"--{flag}")
            elif value is False and fields[name].default is not False:
                args.append(f"--no-{flag}")
            elif value is not None and value is not False:
                args += [f"--{flag}", str(value)]
        return args

    @property
    def nnodes(self) -> int:
        return getattr(self.config, "nnodes", 1)

    @property
    def nproc_per_node(self) -> int:
        """Processes on each node: one GPU each."""
        return getattr(self.config, "nproc_per_node", 1)

    def command(self, resume: bool = False, rendezvous: "Rendezvous | None" = None) -> list[str]:
        """What follows `python`: `-m <program> <flags>`, through torchrun for several processes, and
        for several nodes through torchrun's c10d rendezvous (each node runs this same command).
        torchrun needs `--` before the program's flags: it would take `--run` for its own `--run-path`."""
        processes = self.nproc_per_node
        if self.nnodes > 1:
            if rendezvous is None:
                raise ValueError(f"a job on {self.nnodes} nodes needs their rendezvous")
            torchrun = [
                *("-m", "torch.distributed.run", f"--nnodes={self.nnodes}", f"--nproc_per_node={processes}"),
                *("--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous.endpoint}"),
                f"--rdzv-id={rendezvous.run_id}",
                f"--rdzv-conf=is_host={'true' if rendezvous.is_host else 'false'}",
                f"--local-addr={rendezvous.local_address}",
            ]
        elif processes > 1:
            torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        else:
            return ["-m", self.program, *self.arguments(resume)]
        return [*torchrun, "-m", self.program, "--", *self.arguments(resume)]


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of a multi-node job meet: the first node hosts torchrun's c10d store at
    `endpoint` (host:port); `run_id` is unique per attempt; `local_address` is how others reach this node."""

    endpoint: str
    run_id: str
    is_host: bool
    local_address: str


class TokenizerJob(JobSpec):
    program: ClassVar[str] = "trainer.tok_train"
    stage: ClassVar[str | None] = "tokenizer"
    kind: Literal["tokenizer"]
    config: TokenizerConfig = TokenizerConfig()


class BaseTrainJob(JobSpec):
    program: ClassVar[str] = "trainer.base_train"
    stage: ClassVar[str | None] = "base"
    kind: Literal["base_train"]
    config: BaseTrainConfig = BaseTrainConfig()


class MidTrainJob(JobSpec):
    program: ClassVar[str] = "trainer.mid_train"
    stage: ClassVar[str | None] = "mid"
    kind: Literal["mid_train"]
    config: SupervisedConfig = SupervisedConfig()


class ChatSFTJob(JobSpec):
    program: ClassVar[str] = "trainer.chat_sft"
    stage: ClassVar[str | None] = "sft"
    kind: Literal["chat_sft"]
    config: SupervisedConfig = SupervisedConfig()


class ChatRLJob(JobSpec):
    program: ClassVar[str] = "trainer.chat_rl"
    stage: ClassVar[str | None] = "rl"
    kind: Literal["chat_rl"]
    config: ChatRLConfig = ChatRLConfig()


class BaseEvalJob(JobSpec):
    program: ClassVar[str] = "trainer.base_eval"
    kind: Literal["base_eval"]
    config: BaseEvalConfig = BaseEvalConfig()


class ChatEvalJob(JobSpec):
    program: ClassVar[str] = "trainer.chat_eval"
    kind: Literal["chat_eval"]
    config: ChatEvalConfig = ChatEvalConfig()

    @property
    def report_section(self) -> str:
        return f"chat_eval_{self.config.source}"


ProgramJob = TokenizerJob | BaseTrainJob | MidTrainJob | ChatSFTJob | ChatRLJob | BaseEvalJob | ChatEvalJob
StageKind = Literal["tokenizer", "base_train", "mid_train", "chat_sft", "chat_rl", "base_eval", "chat_eval"]
STAGE_KINDS: tuple[str, ...] = get_args(StageKind)  # a pipeline's order


class PipelineConfig(StrictModel):
    """Each stage's config (defaults when left out); stages in `skip` are not run. The chat stages
    start from the latest earlier stage that runs, unless their config names a source."""

    skip: list[StageKind] = Field(default_factory=list, description="stages not to run")
    tokenizer: TokenizerConfig = TokenizerConfig()
    base_train: BaseTrainConfig = BaseTrainConfig()
    mid_train: SupervisedConfig = SupervisedConfig()
    chat_sft: SupervisedConfig = SupervisedConfig()
    chat_rl: ChatRLConfig = ChatRLConfig()
    base_eval: BaseEvalConfig = BaseEvalConfig()
    chat_eval: ChatEvalConfig | None = Field(default=None, description="default: the last chat stage's model")

    @model_validator(mode="after")
    def something_to_run(self) -> "PipelineConfig":
        if set(self.skip) >= set(STAGE_KINDS):
            raise ValueError("every stage is skipped: nothing to run")
        return self


class PipelineJob(JobSpec):
    """tokenizer → base_train → mid_train → chat_sft → chat_rl → base_eval → chat_eval, each stage a
    job of its own that starts when the one before it has finished."""

    program: ClassVar[str] = ""
    kind: Literal["pipeline"]
    config: PipelineConfig = PipelineConfig()

    @model_validator(mode="after")
    def something_to_run(self) -> "PipelineJob":
        if not self.stages():
            raise ValueError("no stage would run (a chat_eval needs a chat stage before it)")
        return self

    def stages(self) -> list[ProgramJob]:
        """The jobs to run, in order."""
        config, chosen, latest_chat = self.config, [], "base"
        for kind in STAGE_KINDS:
            if kind in config.skip:
                continue
            stage_config = getattr(config, kind)
            if kind in ("mid_train", "chat_sft", "chat_rl") and stage_config.source is None:
                stage_config = stage_config.model_copy(update={"source": latest_chat})
            if kind == "chat_eval" and stage_config is None:
                if latest_chat == "base":
                    continue  # no chat model to evaluate
                stage_config = ChatEvalConfig(source=latest_chat)
            chosen.append(JOB_SPEC.validate_python({"kind": kind, "run": self.run, "config": stage_config}))
            latest_chat = {"mid_train": "mid", "chat_sft": "sft", "chat_rl": "rl"}.get(kind, latest_chat)
        return chosen


AnyJobSpec = Annotated[ProgramJob | PipelineJob, Field(discriminator="kind")]
JOB_SPEC = TypeAdapter(AnyJobSpec)


def json_schemas() -> dict[str, dict]:
    """Each kind's JSON Schema (defaults, bounds, descriptions): what a form is built from."""
    kinds = [
        TokenizerJob,
        BaseTrainJob,
        MidTrainJob,
        ChatSFTJob,
        ChatRLJob,
        BaseEvalJob,
        ChatEvalJob,
        PipelineJob,
    ]
    return {kind.model_fields["kind"].annotation.__args__[0]: kind.model_json_schema() for kind in kinds}
