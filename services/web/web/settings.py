"""Web settings, from the environment (or a .env file in the working directory)."""

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class WebSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore")

    web_host: str = Field(default="127.0.0.1", description="Interface to listen on (0.0.0.0 in containers).")
    web_port: int = Field(default=8080, ge=1, le=65535)
    public_api_url: str = Field(
        default="http://localhost:8000", description="The API as the browser reaches it."
    )
    public_inference_url: str = Field(
        default="http://localhost:8001", description="The inference server as the browser reaches it."
    )
