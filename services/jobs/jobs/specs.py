"""
What a client may ask for: one pydantic model per job kind, unknown fields forbidden and every value
bounded, so a bad request is refused with the field's name before anything reaches the queue. A spec
also knows the trainer program that runs it. Each config field is that program's flag of the same name,
type and bounds (the programs bound their flags with trainer.common.Bounded; tests/jobs/test_specs.py
checks the two agree), except the runner's own options (retries, time limit, processes, nodes), which
never reach the program; the few flags a job cannot set are in FLAGS_NOT_EXPOSED with the reason.
"""

import re
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

# Same rule as the trainer's --run: a run name is one safe path component.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
RunName = Annotated[str, Field(pattern=NAME_PATTERN, description="run folder name")]
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
ChatStage = Literal["mid", "sft", "rl"]
ModelStage = Literal["base", "mid", "sft", "rl"]
RecipeName = Literal["current", "classic"]  # nanochat 92d63d4 and 348fbb3 (README: "Chat stages")
# An uploaded file (POST /files), as trainer/user_files.py names them.
FILE_ID_PATTERN = r"^file-[0-9a-f]{24}$"
FileId = Annotated[str, Field(pattern=FILE_ID_PATTERN, description="an uploaded file's id (POST /files)")]
CORPUS = "an uploaded pretraining corpus (its file id) instead of the pretraining shards"

# The programs' flags that no job sets, and why. Every other flag is a config field.
FLAGS_NOT_EXPOSED = {
    "run": "the spec's own `run` field",
    "device": "the worker decides: the GPUs it was given, else the CPU",
    "resume_from_step": "a retry continues from the latest checkpoint (`resume`); a fixed step would send "
    "every retry back to it",
    "out": "exports go to runs/<run>/exports/, where the API serves them (GET /models/{id}/download)",
}

# Bounds several flags share, under the names trainer/common.py gives them.
MAX_STEPS = 10_000_000
StepCount = Annotated[int, Field(ge=1, le=MAX_STEPS)]
EveryNSteps = Annotated[int, Field(ge=-1, le=MAX_STEPS)]  # and at the end; 0: only at the end; -1: off
LearningRate = Annotated[float, Field(ge=0, le=10)]  # 0 freezes the group
Fraction = Annotated[float, Field(ge=0, le=1)]
BatchSize = Annotated[int, Field(ge=1, le=4096)]  # rows per forward pass
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
CheckpointStep = Annotated[int, Field(ge=0)]
EvalTokens = Annotated[int, Field(ge=1, le=2**34)]
PerTask = Annotated[int, Field(ge=-1, le=1_000_000)]  # problems evaluated per task; -1 (or 0): all
Samples = Annotated[int, Field(ge=1, le=1024)]  # replies per question
NewTokens = Annotated[int, Field(ge=1, le=65536)]  # tokens per reply
Temperature = Annotated[float, Field(ge=0, le=10)]  # 0: greedy
TopK = Annotated[int, Field(ge=1, le=1_000_000)]
# An evaluation budget's default (trainer/eval_budget.py).
SIZED = " (default: the reference's on CUDA, sized to the run elsewhere)"


# A Hugging Face hub repo id (owner/name), as the hub spells them.
HUB_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def inside_the_base_dir(path: str) -> str:
    """A path the programs read relative to the base dir: relative, and no '..' to climb out of it."""
    if path.startswith("/") or ".." in path.split("/"):
        raise ValueError("must be a path inside the base dir: relative, without '..'")
    return path


def folder_or_hub_repo(source: str) -> str:
    """An import's source: a hub repo id, else a folder inside the base dir. (A path of two parts looks
    like a repo id too; the program takes a folder that exists before going to the hub.)"""
    return source if HUB_REPO.fullmatch(source) else inside_the_base_dir(source)


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
        default=None, description="compute dtype (default auto: bfloat16 on recent GPUs, else float32)"
    )


class StepFlags(ModelProgramOptions):
    """Flags of every training program (base, mid, SFT, RL)."""

    num_iterations: StepCount | None = Field(default=None, description="optimizer steps (default: derived)")
    device_batch_size: BatchSize | None = Field(default=None, description="rows per forward pass")
    eval_every: EveryNSteps | None = Field(
        default=None, description="steps between evals (and one at the end), 0: only at the end, -1: off"
    )
    save_every: EveryNSteps | None = Field(
        default=None, description="steps between checkpoints (one at the end too), -1: only at the end"
    )
    keep_checkpoints: int | None = Field(default=None, ge=0, le=1000, description="checkpoints kept, 0: all")
    resume: bool = Field(default=False, description="continue from the run's latest checkpoint")
    seed: Seed | None = None


class TrainingFlags(StepFlags):
    """Flags of the programs that train on token batches (base, mid, SFT)."""

    total_batch_size: int | None = Field(
        default=None, ge=16, le=2**26, description="tokens per optimizer step"
    )
    max_seq_len: int | None = Field(default=None, ge=16, le=65536, description="tokens per sequence")
    compile: bool | None = Field(default=None, description="torch.compile (default: on for CUDA)")


class LearningRates(StrictModel):
    """The recipe's LRs (base_train: 0.02, 0.3, 0.008, 0.5 before its batch factor; the current SFT: the
    base run's, scalar 0.5; mid, the classic SFT and RL: 0.02, 0.2, 0.004, 0.5)."""

    matrix_lr: LearningRate | None = Field(default=None, description="Muon LR of the matrices")
    embedding_lr: LearningRate | None = Field(default=None, description="AdamW LR of the token embeddings")
    unembedding_lr: LearningRate | None = Field(default=None, description="AdamW LR of the lm_head")
    scalar_lr: LearningRate | None = Field(default=None, description="AdamW LR of the per-layer scalars")


class ChatSourceFlags(LearningRates):
    """Where a chat stage starts from (its `source` stage is each config's own), and its LR fraction."""

    source_run: RunName | None = Field(default=None, description="run to start from (default: this run)")
    source_step: CheckpointStep | None = Field(default=None, description="its checkpoint (default: latest)")
    init_lr_frac: float | None = Field(default=None, gt=0, le=10, description="every LR × this")


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
    corpus: FileId | None = Field(default=None, description=CORPUS)


class BaseTrainConfig(LearningRates, TrainingFlags):
    """The base_train flags; unset ones take the program's defaults (some derived from depth)."""

    depth: int = Field(default=12, ge=1, le=64, description="transformer layers: the one dial")
    head_dim: int | None = Field(
        default=None, ge=16, le=256, description="channels per attention head (default: 128)"
    )
    aspect_ratio: int | None = Field(
        default=None, ge=1, le=1024, description="width = aspect ratio × depth (default: 64)"
    )
    n_kv_head: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="key/value heads for GQA, a divisor of the heads (default: all)",
    )
    window_pattern: str | None = Field(
        default=None,
        pattern=r"^[SLsl]{1,16}$",
        description="windows over layers, S=¼ context, L=full (default: SSSL)",
    )
    value_embeds: bool | None = Field(
        default=None, description="value embeddings on alternating layers (default: on)"
    )
    smear: bool | None = Field(
        default=None, description="gated mix of the previous token's embedding (default: on)"
    )
    backout: bool | None = Field(default=None, description="subtract the mid-network residual (default: on)")
    layer_scalars: bool | None = Field(
        default=None, description="learned per-layer residual and x0 scalars (default: on)"
    )
    softcap: float | None = Field(default=None, gt=0, le=1000, description="logit soft-cap (default: 15)")
    rope_base: float | None = Field(default=None, gt=1, le=1e9, description="rotary base (default: 100,000)")
    qk_scale: float | None = Field(
        default=None, gt=0, le=100, description="q and k scale after QK-norm (default: 1.2)"
    )
    corpus: FileId | None = Field(default=None, description=CORPUS)
    split_docs: bool | None = Field(
        default=None, description="long documents as row-sized chunks instead of cropped (default: off)"
    )
    fp8: bool | None = Field(
        default=None,
        description="training matmuls in float8, tensorwise scaling (GPUs of compute capability ≥ 8.9, or "
        "the CPU) (default: off)",
    )
    target_param_data_ratio: float | None = Field(
        default=None, gt=0, le=1000, description="tokens per parameter (default: 12)"
    )
    target_flops: float | None = Field(
        default=None,
        gt=0,
        le=1e30,
        description="training FLOPs budget: sets the steps unless num_iterations is given (default: off)",
    )
    weight_decay: float | None = Field(
        default=None, ge=0, le=10, description="Muon weight decay (default: derived)"
    )
    weight_decay_horizon: Literal["planned", "trained"] | None = Field(
        default=None, description="tokens in the derived weight decay's D (default: planned)"
    )
    warmup_steps: int | None = Field(
        default=None, ge=0, le=MAX_STEPS, description="LR warm-up steps (default: 40)"
    )
    warmdown_ratio: Fraction | None = Field(
        default=None, description="share of steps in warm-down (default: 0.65)"
    )
    final_lr_frac: Fraction | None = Field(default=None, description="LR at the end, × peak (default: 0.05)")
    eval_tokens: EvalTokens | None = Field(default=None, description=f"val tokens per bpb eval{SIZED}")
    core_metric_every: EveryNSteps | None = Field(
        default=None, description="steps between CORE evals (and at the end), 0: only at the end, -1: off"
    )
    core_metric_max_per_task: PerTask | None = Field(
        default=None, description=f"CORE examples per task, -1: all{SIZED}"
    )
    sample_every: EveryNSteps | None = Field(
        default=None, description="steps between samples (and at the end), 0: only at the end, -1: off"
    )


class SupervisedConfig(TrainingFlags, ChatSourceFlags):
    """mid_train's flags, which chat_sft has too."""

    source: Literal["base", "mid", "sft"] | None = Field(
        default=None, description="stage to start from (default: the stage before)"
    )
    mixture: str | None = Field(
        default=None,
        pattern=r"^(file-[0-9a-f]{24}|[A-Za-z0-9._/-]{1,200}\.ya?ml)$",
        description="task mixture file, relative to the base dir, or an uploaded mixture's id (default: the "
        "stage's own)",
    )

    @field_validator("mixture")
    @classmethod
    def mixture_inside_the_base_dir(cls, path: str | None) -> str | None:
        return path if path is None else inside_the_base_dir(path)

    warmup_ratio: Fraction | None = Field(default=None, description="share of the run in LR warm-up")
    warmdown_ratio: Fraction | None = Field(default=None, description="share of the run in warm-down")
    final_lr_frac: Fraction | None = Field(default=None, description="LR at the end, × peak")
    load_optimizer: bool | None = Field(default=None, description="start from the source's momentum")
    eval_tokens: EvalTokens | None = Field(default=None, description=f"val tokens per bpb eval{SIZED}")
    chatcore_every: EveryNSteps | None = Field(
        default=None, description="steps between ChatCORE evals (and at the end), 0: only at the end, -1: off"
    )
    chatcore_max_cat: PerTask | None = Field(
        default=None, description=f"problems per choice task, -1: all{SIZED}"
    )
    chatcore_max_sample: PerTask | None = Field(
        default=None, description=f"problems per generative task, -1: all{SIZED}"
    )


class ChatSFTConfig(SupervisedConfig):
    recipe: RecipeName | None = Field(
        default=None,
        description="current: from the base model; classic: light SFT from mid (default: current)",
    )
    examples_per_step: int | None = Field(
        default=None, ge=1, le=65536, description="conversations per step, one a row (classic; default: 32)"
    )


class ChatRLConfig(StepFlags, ChatSourceFlags):
    source: Literal["mid", "sft"] | None = Field(
        default=None, description="stage to start from (default: the stage before)"
    )
    recipe: RecipeName | None = Field(default=None, description="whose optimizer settings (default: current)")
    questions: FileId | None = Field(
        default=None,
        description="an uploaded questions file (its id) to train on and evaluate with (default: GSM8K)",
    )
    num_epochs: int | None = Field(default=None, ge=1, le=1000, description="passes over GSM8K train")
    examples_per_step: BatchSize | None = Field(default=None, description="questions per step")
    num_samples: Samples | None = Field(default=None, description="replies per question")
    max_new_tokens: NewTokens | None = None
    temperature: Temperature | None = None
    top_k: TopK | None = None
    eval_examples: int | None = Field(default=None, ge=1, le=100_000, description="test questions per eval")


class BaseEvalConfig(ModelProgramOptions):
    step: CheckpointStep | None = Field(default=None, description="checkpoint (default: latest)")
    eval: str | None = Field(default=None, pattern=r"^(core|bpb|sample)(,(core|bpb|sample))*$")
    max_per_task: PerTask | None = Field(default=None, description=f"CORE examples per task, -1: all{SIZED}")
    core_tasks: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\.ya?ml$",
        description="CORE task list in the eval bundle (default: core.yaml)",
    )
    split_tokens: EvalTokens | None = Field(default=None, description=f"tokens per split for bpb{SIZED}")
    device_batch_size: BatchSize | None = None


class ChatEvalConfig(ModelProgramOptions):
    source: ChatStage = Field(default="sft", description="which stage's model")
    step: CheckpointStep | None = Field(default=None, description="checkpoint (default: latest)")
    task_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]+(\|[A-Za-z0-9-]+)*$")
    max_problems: int | None = Field(default=None, ge=1, le=1_000_000, description="first N per task")
    batch_size: BatchSize | None = None
    num_samples: Samples | None = None
    max_new_tokens: NewTokens | None = None
    temperature: Temperature | None = None
    top_k: TopK | None = None


class ExportConfig(RunnerOptions):
    stage: ModelStage = Field(default="sft", description="which stage's model")
    step: CheckpointStep | None = Field(default=None, description="checkpoint (default: latest)")
    format: Literal["hf"] = Field(
        default="hf", description="hf: a Hugging Face folder (transformers, lm-eval) and its tarball"
    )


class ImportConfig(RunnerOptions):
    source: str = Field(
        max_length=400,
        pattern=r"^[A-Za-z0-9._][A-Za-z0-9._-]*(/[A-Za-z0-9._][A-Za-z0-9._-]*)*$",  # no empty part, no '-x'
        description="a folder in the data volume, relative to the base dir (an export, a transformers "
        "NanoChat folder or a native nanochat base dir), or a Hugging Face hub repo id (owner/name)",
    )
    revision: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$",
        description="hub branch, tag or commit (default: main)",
    )
    stage: ModelStage = Field(default="sft", description="the stage it becomes in the run")
    model_tag: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="native nanochat dirs: which model, e.g. d20 (default: the largest)",
    )
    step: CheckpointStep | None = Field(
        default=None, description="native nanochat dirs: which checkpoint (default: latest)"
    )

    @field_validator("source", mode="before")  # before the pattern: its message is the clearer one
    @classmethod
    def folder_or_hub_repo(cls, source: object) -> object:
        return folder_or_hub_repo(source) if isinstance(source, str) else source


class ValidateFileConfig(RunnerOptions):
    file: FileId
    val_fraction: float = Field(
        default=0.05, ge=0, le=0.5, description="share of the rows (documents) set aside as the val split"
    )
    max_tokens: int = Field(
        default=2048, ge=16, le=65536, description="a longer conversation is a problem (training cuts it)"
    )


class JobSpec(StrictModel):
    """Fields every job kind has; subclasses add `kind`, `config` and the program that runs them."""

    program: ClassVar[str]  # the trainer module run as `python -m <program>`
    # The run folder it writes (checkpoints, or exports): one writer at a time. A kind whose folder
    # depends on its config makes this a property.
    stage: ClassVar[str | None] = None
    # False: its program never touches a GPU. It runs as one process on the CPU, goes on the CPU jobs'
    # queue (which a worker of its own takes: it never waits behind training), and leaves the model
    # server its GPUs.
    uses_gpu: ClassVar[bool] = True

    run: RunName = "default"

    @property
    def writes(self) -> set[str]:
        """The run's folders the job writes: none of them may have another active writer."""
        return {self.stage} if self.stage else set()

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
        """Processes on each node: one GPU each (0: one process on the CPU, see uses_gpu)."""
        return getattr(self.config, "nproc_per_node", 1) if self.uses_gpu else 0

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
    uses_gpu: ClassVar[bool] = False  # BPE training (rustbpe) is CPU work
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
    config: ChatSFTConfig = ChatSFTConfig()


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


class ExportJob(JobSpec):
    """Reads a checkpoint, writes runs/<run>/exports/. Its writer slot is that exports folder: one export
    of a run at a time, while training may go on (the checkpoint it reads is complete and no longer
    written; one pruned meanwhile by keep_checkpoints fails the export, and a retry takes the latest)."""

    program: ClassVar[str] = "trainer.export"
    stage: ClassVar[str | None] = "exports"
    uses_gpu: ClassVar[bool] = False  # it converts files
    kind: Literal["export"]
    config: ExportConfig = ExportConfig()


class ImportJob(JobSpec):
    program: ClassVar[str] = "trainer.model_import"
    uses_gpu: ClassVar[bool] = False  # as ExportJob
    kind: Literal["import"]
    config: ImportConfig

    @property
    def stage(self) -> str:
        """The stage its config names (a property where other kinds have a class attribute)."""
        return self.config.stage

    @property
    def writes(self) -> set[str]:
        return {self.config.stage, "tokenizer"}  # the run's tokenizer comes with the model


class ValidateFileJob(JobSpec):
    """Checks an uploaded file and prepares it (POST /files submits it); its run's tokenizer counts the
    tokens. It writes the file's folder, not the run's."""

    program: ClassVar[str] = "trainer.validate_file"
    uses_gpu: ClassVar[bool] = False  # it reads text
    kind: Literal["validate_file"]
    config: ValidateFileConfig


ProgramJob = (
    TokenizerJob | BaseTrainJob | MidTrainJob | ChatSFTJob | ChatRLJob | BaseEvalJob | ChatEvalJob | ExportJob
    | ImportJob | ValidateFileJob
)  # fmt: skip
StageKind = Literal["tokenizer", "base_train", "mid_train", "chat_sft", "chat_rl", "base_eval", "chat_eval"]
STAGE_KINDS: tuple[str, ...] = get_args(StageKind)  # a pipeline's order


# The stages each recipe runs, in order (chat_rl where `rl` asks for it).
RECIPE_STAGES: dict[str, tuple[str, ...]] = {
    "current": ("tokenizer", "base_train", "chat_sft", "chat_rl", "base_eval", "chat_eval"),
    "classic": STAGE_KINDS,
}


class PipelineConfig(StrictModel):
    """The recipe and each stage's config (defaults when left out); stages in `skip` are not run. The chat
    stages start from the latest earlier stage that runs, unless their config names a source."""

    recipe: RecipeName = Field(
        default="current",
        description="current (nanochat 92d63d4): tokenizer → base → SFT from base → evals; classic (348fbb3, "
        "the seed's `train.sh all`): tokenizer → base → mid → SFT → RL → evals",
    )
    rl: bool | None = Field(
        default=None, description="RL on GSM8K after SFT (default: classic yes, current no)"
    )
    skip: list[StageKind] = Field(default_factory=list, description="stages not to run")
    tokenizer: TokenizerConfig = TokenizerConfig()
    base_train: BaseTrainConfig = BaseTrainConfig()
    mid_train: SupervisedConfig = SupervisedConfig()
    chat_sft: ChatSFTConfig = ChatSFTConfig()
    chat_rl: ChatRLConfig = ChatRLConfig()
    base_eval: BaseEvalConfig = BaseEvalConfig()
    chat_eval: ChatEvalConfig | None = Field(default=None, description="default: the last chat stage's model")

    @model_validator(mode="after")
    def something_to_run(self) -> "PipelineConfig":
        if set(self.skip) >= set(STAGE_KINDS):
            raise ValueError("every stage is skipped: nothing to run")
        return self

    @model_validator(mode="after")
    def one_recipe(self) -> "PipelineConfig":
        if self.recipe == "current" and "mid_train" in self.model_fields_set:
            raise ValueError("the current recipe has no midtraining: a mid_train config needs recipe classic")
        for kind in ("chat_sft", "chat_rl"):
            named = getattr(self, kind).recipe
            if named not in (None, self.recipe):
                raise ValueError(f"{kind} names recipe {named!r} in a {self.recipe!r} pipeline")
        return self

    def kinds(self) -> list[str]:
        """The recipe's stages that run, in order."""
        rl = self.rl if self.rl is not None else self.recipe == "classic"
        return [
            kind for kind in RECIPE_STAGES[self.recipe] if kind not in self.skip and (kind != "chat_rl" or rl)
        ]


class PipelineJob(JobSpec):
    """The stages of a recipe (PipelineConfig), each a job of its own that starts when the one before it
    has finished."""

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
        for kind in config.kinds():
            stage_config = getattr(config, kind)
            if kind == "chat_eval" and stage_config is None:
                if latest_chat == "base":
                    continue  # no chat model to evaluate
                stage_config = ChatEvalConfig(source=latest_chat)
            values = stage_config.model_dump()
            if kind in ("mid_train", "chat_sft", "chat_rl") and values["source"] is None:
                values["source"] = latest_chat  # validated: chat_rl cannot start from base
            if kind in ("chat_sft", "chat_rl"):
                values["recipe"] = config.recipe
            chosen.append(JOB_SPEC.validate_python({"kind": kind, "run": self.run, "config": values}))
            latest_chat = {"mid_train": "mid", "chat_sft": "sft", "chat_rl": "rl"}.get(kind, latest_chat)
        return chosen


AnyJobSpec = Annotated[ProgramJob | PipelineJob, Field(discriminator="kind")]
JOB_SPEC = TypeAdapter(AnyJobSpec)


# Every kind's spec class, by its `kind`.
SPEC_CLASSES: dict[str, type[JobSpec]] = {
    cls.model_fields["kind"].annotation.__args__[0]: cls for cls in (*get_args(ProgramJob), PipelineJob)
}


def json_schemas() -> dict[str, dict]:
    """Each kind's JSON Schema (defaults, bounds, descriptions): what a form is built from."""
    return {kind: cls.model_json_schema() for kind, cls in SPEC_CLASSES.items()}
