"""The web server: the single-page UI, its browser libraries (from node_modules, never a CDN), and the
reverse proxy to the API (/api) and the model server (/v1), so the browser talks to one origin."""

import base64
import hashlib
import re
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from web.proxy import forward, upstream_client
from web.settings import WebSettings

STATIC_DIR = Path(__file__).parent / "static"
LIBRARIES = ("marked", "dompurify", "@highlightjs/cdn-assets", "uplot")  # package.json's dependencies
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def content_security_policy(page: str) -> str:
    """Scripts from this origin only, plus the page's inline import map by its hash: even markup that
    slipped into the page could not run a script, and no CDN can be reached."""
    import_map = re.search(r'<script type="importmap">(.*?)</script>', page, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(import_map.group(1).encode()).digest()).decode()
    return (
        f"default-src 'self'; script-src 'self' 'sha256-{digest}'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    )


class SecurityHeaders:
    """The page's own responses get the policy; proxied ones pass through as the services sent them."""

    def __init__(self, app: ASGIApp, policy: str) -> None:
        self.app = app
        self.headers = [
            (b"content-security-policy", policy.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"no-referrer"),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(("/api/", "/v1/")):
            return await self.app(scope, receive, send)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(settings: WebSettings) -> FastAPI:
    missing = [name for name in LIBRARIES if not (settings.web_node_modules / name).is_dir()]
    if missing:
        raise SystemExit(
            f"browser libraries missing from {settings.web_node_modules}: {', '.join(missing)}; "
            "run `make setup` (npm ci in services/web) or set WEB_NODE_MODULES"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with upstream_client() as client:
            app.state.client = client
            yield

    app = FastAPI(
        title="nanochat-stack web", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan
    )

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.api_route("/api/{path:path}", methods=METHODS, include_in_schema=False)
    async def api(path: str, request: Request):
        return await forward(request.app.state.client, settings.web_api_url, path, request)

    @app.api_route("/v1/{path:path}", methods=METHODS, include_in_schema=False)
    async def inference(path: str, request: Request):
        return await forward(request.app.state.client, settings.web_inference_url, f"v1/{path}", request)

    for name in LIBRARIES:
        app.mount(f"/vendor/{name}", StaticFiles(directory=settings.web_node_modules / name))
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    app.add_middleware(SecurityHeaders, policy=content_security_policy(page))
    return app
