"""API settings, from the environment (or a .env file in the working directory)."""

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Values people paste from examples: never accepted as a real token.
PLACEHOLDER_TOKENS = {"change-me", "changeme", "secret", "token", "password", "your-token-here"}
MIN_TOKEN_LENGTH = 16


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore")

    api_token: SecretStr | None = Field(default=None, description="Bearer token for every route but /health.")
    public_read: bool = Field(
        default=False,
        description="Let GET routes through without the token (logs and configs become public).",
    )
    dev_mode: bool = Field(
        default=False, description="Allow starting without API_TOKEN (local development only)."
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Redis holding the queue and records."
    )
    base_dir: Path = Field(
        default=Path("~/.cache/nanochat"),
        validation_alias=AliasChoices("NANOCHAT_BASE_DIR"),
        description="Runs live here: the model registry lists their checkpoints.",
    )
    api_host: str = Field(default="127.0.0.1", description="Interface to listen on (0.0.0.0 in containers).")
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_max_body_bytes: int = Field(default=1_000_000, ge=1024, description="Larger request bodies get 413.")
    api_max_upload_bytes: int = Field(
        default=1_073_741_824, ge=1024, description="Largest file upload (POST /files) in bytes; 413 beyond."
    )
    api_max_followers_per_job: int = Field(
        default=8, ge=1, description="Open log/metrics streams per job; more get 429."
    )
    api_max_followers: int = Field(
        default=256, ge=1, description="Open log/metrics streams in all; more get 429."
    )

    @property
    def runs_dir(self) -> Path:
        return self.base_dir.expanduser() / "runs"

    @model_validator(mode="after")
    def refuse_missing_or_placeholder_token(self) -> "Settings":
        token = self.api_token.get_secret_value() if self.api_token else ""
        if self.dev_mode and not token:
            return self
        hint = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        if not token:
            raise ValueError(f"API_TOKEN is not set (set DEV_MODE=1 to run without one locally); {hint}")
        if token.lower() in PLACEHOLDER_TOKENS or len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"API_TOKEN is a placeholder or shorter than {MIN_TOKEN_LENGTH} characters; {hint}"
            )
        return self
