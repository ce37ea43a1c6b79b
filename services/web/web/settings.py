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
    # The proxy reads a request's whole body before it opens an upstream request, so a slow sender
    # holds no upstream connection; the two services refuse bodies over 1 MB anyway, uploads aside.
    web_max_body_bytes: int = Field(
        default=1_000_000,
        ge=1024,
        description="Largest request body the proxy takes (413 beyond), uploads aside.",
    )
    web_body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a client has to send its request body, or an upload may pause (408 after).",
    )
    # Streams (chat replies, followed logs) stay open for minutes: the limits bound how many of the
    # pooled upstream connections one client can hold. A browser opens at most 6 connections per origin.
    web_max_upstream_requests: int = Field(
        default=100, ge=1, description="Open upstream requests (streams included) in all; more get 503."
    )
    web_max_upstream_requests_per_client: int = Field(
        default=16,
        ge=1,
        description="Open upstream requests per client address (clients behind one NAT or Docker's port "
        "proxy share one); more get 429.",
    )
    web_max_uploads: int = Field(
        default=4,
        ge=1,
        description="Uploads (multipart bodies, streamed through as they arrive) open at once, one per "
        "client address; more get 503 (429 from the same address). Besides WEB_MAX_UPSTREAM_REQUESTS.",
    )
