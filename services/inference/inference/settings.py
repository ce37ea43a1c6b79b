"""Inference settings, from the environment (or a .env file in the working directory)."""

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from trainer.settings import TrainerSettings

MIN_TOKEN_LENGTH = 16


class InferenceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore")

    inference_host: str = Field(
        default="127.0.0.1", description="Interface to listen on (0.0.0.0 in containers)."
    )
    inference_port: int = Field(default=8001, ge=1, le=65535)
    api_token: SecretStr | None = Field(
        default=None, description="Bearer token for every route but /health (the API's token)."
    )
    dev_mode: bool = Field(default=False, description="Allow starting without API_TOKEN (local only).")
    inference_cors_origins: str = Field(
        default="http://localhost:8080,http://127.0.0.1:8080",
        description="Comma-separated browser origins allowed to call the server (the web UI's).",
    )
    inference_device: str = Field(default="auto", description="cuda, cpu or auto.")
    inference_gpus: str | None = Field(
        default=None,
        pattern=r"^[0-9]+(,[0-9]+)*$",
        description="GPU ids (nvidia-smi's) the model server may use (it uses the first); unset: the last "
        "GPU it sees",
    )
    redis_url: str | None = Field(
        default=None,
        description="The workers' Redis: through it the model server makes way on its GPU for a training "
        "job that needs it; unset: it never does.",
    )
    inference_dtype: str = Field(
        default="auto", description="Compute dtype: auto (bf16 on a GPU that has it, else fp32)."
    )
    inference_default_model: str | None = Field(
        default=None,
        description="Model id behind the `default` alias; empty: the newest chat checkpoint.",
    )
    inference_max_batch_size: int = Field(
        default=32, ge=1, le=1024, description="Sequences decoded together in one step, per model."
    )
    inference_max_waiting: int = Field(
        default=64, ge=0, description="Requests waiting for a batch slot, per model; beyond: 429."
    )
    inference_prefix_cache_tokens: int = Field(
        default=16384,
        ge=0,
        description="Token positions of finished requests' KV kept per model for reuse, in KV cache blocks "
        "no running sequence holds (taken back, least recently used first, when one needs them), so a prompt "
        "that starts the same (the next chat turn) shares them and prefills only its new tokens; 0: off.",
    )
    inference_prefill_chunk_tokens: int = Field(
        default=512,
        ge=0,
        description="Prompt tokens prefilled per step between decode steps, so a long prompt delays the "
        "running streams by one chunk at a time; 0: whole prompts in one forward.",
    )
    inference_kv_cache_tokens: int = Field(
        default=0,
        ge=0,
        description="Token positions of KV cache per model, in blocks of 16, for the running sequences, "
        "the prompts being prefilled and the prefix cache (paged): a request waits for the blocks of its "
        "prompt, and when they run out the latest admitted (a prompt being prefilled, or else a running "
        "sequence) gives its blocks up and is prefilled again later; 0: max batch size × the model's "
        "context.",
    )
    inference_cuda_graphs: bool = Field(
        default=False,
        description="On a CUDA device, capture each decode step as a CUDA graph (one per batch size and "
        "cached length, rounded up to powers of two, the first time each is needed) and replay it: one "
        "launch instead of hundreds per token. Ignored on a CPU.",
    )
    inference_max_model_memory_gb: float = Field(
        default=8.0,
        gt=0,
        description="Loaded models (weights + KV cache + gathered keys and values) are evicted, least "
        "recently used first, past this.",
    )
    inference_max_messages: int = Field(default=256, ge=1, description="Messages per chat request.")
    inference_max_request_bytes: int = Field(
        default=1_000_000, ge=1024, description="Largest request body accepted (413 beyond)."
    )

    @model_validator(mode="after")
    def refuse_missing_token(self) -> "InferenceSettings":
        # The same rule as the API's (one token for the whole stack).
        token = self.api_token.get_secret_value() if self.api_token else ""
        if not token and not self.dev_mode:
            raise ValueError("API_TOKEN is not set (set DEV_MODE=1 to run without one locally)")
        if token and len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"API_TOKEN is shorter than {MIN_TOKEN_LENGTH} characters")
        return self

    @property
    def cors_origins(self) -> list[str]:
        return [origin.strip() for origin in self.inference_cors_origins.split(",") if origin.strip()]

    @property
    def runs_dir(self) -> Path:
        """Where the trainer writes runs (NANOCHAT_BASE_DIR/runs)."""
        return TrainerSettings().base_dir.expanduser() / "runs"
