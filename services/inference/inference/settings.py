"""Inference settings, from the environment (or a .env file in the working directory)."""

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class InferenceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore")

    inference_host: str = Field(
        default="127.0.0.1", description="Interface to listen on (0.0.0.0 in containers)."
    )
    inference_port: int = Field(default=8001, ge=1, le=65535)
