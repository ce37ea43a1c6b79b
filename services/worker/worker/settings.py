"""Worker settings, from the environment (or a .env file in the working directory)."""

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis import Redis


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore")

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Redis holding the queue and records."
    )
    base_dir: Path = Field(
        default=Path("~/.cache/nanochat"),
        validation_alias=AliasChoices("NANOCHAT_BASE_DIR"),
        description="Runs live here; job logs are also written to runs/<run>/logs/<job id>.log.",
    )
    data_dir: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("NANOCHAT_DATA_DIR"),
        description="A local data kit handed to the trainer programs; unset, they download data.",
    )
    cancel_grace_seconds: float = Field(
        default=60.0,
        gt=0,
        validation_alias=AliasChoices("JOB_CANCEL_GRACE_SECONDS"),
        description="After SIGTERM (the trainer checkpoints and exits), wait this long before SIGKILL.",
    )
    job_lease_seconds: float = Field(
        default=30.0,
        ge=3,
        le=3600,
        validation_alias=AliasChoices("JOB_LEASE_SECONDS"),
        description="A running job's worker renews its lease this often ×⅓; a job whose lease has expired "
        "is taken as abandoned (its worker died) and re-queued.",
    )
    queues: str = Field(
        default="gpu,cpu",
        pattern=r"^(cpu|gpu)(,(cpu|gpu))?$",
        validation_alias=AliasChoices("WORKER_QUEUES"),
        description="Which jobs this worker takes, the first named first when both wait: gpu (model "
        "training and evaluation: on GPUs where there are any) and cpu (tokenizer training, exports, "
        "imports, file validations: never on a GPU). compose and make up also run a worker of cpu alone, so "
        "these never wait for a model's training to end.",
    )
    gpus: str | None = Field(
        default=None,
        pattern=r"^[0-9]+(,[0-9]+)*(;[0-9]+(,[0-9]+)*)*$",
        validation_alias=AliasChoices("WORKER_GPUS"),
        description="GPU ids (nvidia-smi's) this worker's jobs may use, e.g. 0,1,2; unset: all. A job runs "
        "on the first nproc_per_node of them. Sets separated by ; (0,1,2,3;4,5,6,7) give workers started "
        "alike one set each.",
    )
    machine: str = Field(
        default="local",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        validation_alias=AliasChoices("WORKER_MACHINE"),
        description="Which machine this worker is on, for GPU sets: workers of one machine share them; "
        "give each machine that joins the same Redis its own name.",
    )
    address: str | None = Field(
        default=None,
        validation_alias=AliasChoices("WORKER_ADDRESS"),
        description="How workers on other machines reach this one when it hosts a multi-node job's "
        "rendezvous; unset: the address this machine reaches Redis from.",
    )
    rendezvous_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        validation_alias=AliasChoices("WORKER_RENDEZVOUS_PORT"),
        description="Port a multi-node job's rendezvous is hosted on (open it between the machines); "
        "0: a free one.",
    )
    job_retention_days: float = Field(
        default=30.0,
        gt=0,
        validation_alias=AliasChoices("JOB_RETENTION_DAYS"),
        description="Records, logs and metrics of jobs that ended longer ago are deleted (checkpoints stay).",
    )

    @property
    def queue_kinds(self) -> list[str]:
        """WORKER_QUEUES as a list, in order: RQ takes from the first queue that holds a job."""
        return list(dict.fromkeys(self.queues.split(",")))


REDIS_TIMEOUT_SECONDS = 5  # a Redis that went away makes a call fail fast: the job's pipe keeps draining


def connect(settings: WorkerSettings) -> Redis:
    """The worker's own Redis client (the reaper's, and each job's), with short timeouts."""
    return Redis.from_url(
        settings.redis_url, socket_timeout=REDIS_TIMEOUT_SECONDS, socket_connect_timeout=REDIS_TIMEOUT_SECONDS
    )
