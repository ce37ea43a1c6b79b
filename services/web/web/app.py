from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from web.settings import WebSettings

STATIC_DIR = Path(__file__).parent / "static"


def create_app(settings: WebSettings) -> FastAPI:
    app = FastAPI(title="nanochat-stack web", version="0.1.0", docs_url=None, redoc_url=None)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/config.json")
    def config() -> dict:
        """Where the page's scripts find the other services."""
        return {"api_url": settings.public_api_url, "inference_url": settings.public_inference_url}

    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app
