"""Web settings, from the environment (or a .env file in the working directory)."""

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

SOURCE_NODE_MODULES = Path(__file__).resolve().parent.parent / "node_modules"  # `npm ci` in services/web


class WebSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore")

    web_host: str = Field(default="127.0.0.1", description="Interface to listen on (0.0.0.0 in containers).")
    web_port: int = Field(default=8080, ge=1, le=65535)
    web_api_url: str = Field(
        default="http://127.0.0.1:8000", description="The API as this server reaches it (proxied at /api)."
    )
    web_inference_url: str = Field(
        default="http://127.0.0.1:8001",
        description="The model server as this server reaches it (proxied at /v1).",
    )
    web_node_modules: Path = Field(
        default=SOURCE_NODE_MODULES, description="Where `npm ci` put the browser libraries."
    )
