"""Where the trainer reads and writes, from the environment (or a .env file in the working directory)."""

from pathlib import Path

from pydantic import AliasChoices, Field, PrivateAttr, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# nanochat's pretraining corpus: ~100 MB parquet shards, shard_00000 … shard_06542 (the pinned val shard).
CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_LAST_SHARD = 6542


class TrainerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NANOCHAT_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    base_dir: Path = Field(
        default=Path("~/.cache/nanochat"),
        description="Runs (tokenizer, checkpoints, reports) and downloaded data live here.",
    )
    data_dir: Path | None = Field(
        default=None,
        description="A local data kit (pretrain/, sft/, gsm8k/, ...). Unset: download into base_dir/data.",
    )
    pretrain_url: str = Field(
        default=CLIMBMIX_URL,
        description="Where pretraining shards are downloaded from: an http(s) base URL or a local folder.",
    )
    pretrain_last_shard: int = Field(
        default=CLIMBMIX_LAST_SHARD,
        ge=1,
        description="Index of the source's last shard, which is always fetched as the validation split.",
    )

    # An uploaded corpus to pretrain on: set by a program's --corpus (with_corpus), never by the environment.
    _corpus_dir: Path | None = PrivateAttr(default=None)

    gpu_hour_price: float = Field(
        default=3.0,
        ge=0,
        description="US dollars per GPU-hour, for the cost estimate in run reports.",
    )

    wandb_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("WANDB_API_KEY"),
        description="Turns wandb logging on for training runs (the run name is the wandb run name).",
    )
    wandb_project: str = Field(
        default="nanochat",
        description="wandb project for training runs (wandb is on when WANDB_API_KEY is set).",
    )

    @property
    def data_root(self) -> Path:
        """The folder with the data kit's layout, local or downloaded."""
        return (self.data_dir or self.base_dir / "data").expanduser()

    @property
    def downloads_allowed(self) -> bool:
        """A local kit is used as it is; only the base dir's copy is filled by downloads."""
        return self.data_dir is None

    def with_corpus(self, folder: Path) -> "TrainerSettings":
        """These settings, pretraining on the shards in `folder` (an uploaded corpus, --corpus)."""
        settings = self.model_copy()
        settings._corpus_dir = folder
        return settings

    @property
    def pretrain_dir(self) -> Path:
        """Where the pretraining shards are: a corpus of one's own, else the data kit's layout."""
        return self._corpus_dir or self.data_root / "pretrain"

    @property
    def shard_downloads(self) -> bool:
        """Pretraining shards are downloaded only into the base dir's copy of the data kit."""
        return self.downloads_allowed and self._corpus_dir is None

    def run_dir(self, run: str) -> Path:
        return self.base_dir.expanduser() / "runs" / run
