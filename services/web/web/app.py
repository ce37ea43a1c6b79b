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

from web.proxy import Proxy
from web.settings import WebSettings

STATIC_DIR = Path(__file__).parent / "static"
LIBRARIES = ("marked", "dompurify", "@highlightjs/cdn-assets", "uplot")  # package.json's dependencies
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
PROXIED = ("/api/", "/v1/")
# The services answer data, never a page of this origin: whatever they send (an HTML error page, a
# downloaded file) may run nothing, load nothing and be framed by nothing.
PROXIED_POLICY = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; sandbox"


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


def security_headers(policy: str) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-security-policy", policy.encode()),
        (b"x-content-type-options", b"nosniff"),
        (b"referrer-policy", b"no-referrer"),
    ]


class SecurityHeaders:
    """Every response gets them: the page's own with its policy, proxied ones with PROXIED_POLICY."""

    def __init__(self, app: ASGIApp, policy: str) -> None:
        self.app = app
        self.page_headers = security_headers(policy)
        self.proxied_headers = security_headers(PROXIED_POLICY)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = self.proxied_headers if scope["path"].startswith(PROXIED) else self.page_headers

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *headers]
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
        app.state.proxy = Proxy(settings)
        yield
        await app.state.proxy.aclose()

    app = FastAPI(
        title="nanochat-stack web", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan
    )

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    api_url = settings.web_api_url.rstrip("/")
    inference_url = f"{settings.web_inference_url.rstrip('/')}/v1"

    @app.api_route("/api/{path:path}", methods=METHODS, include_in_schema=False)
    async def api(path: str, request: Request):
        return await request.app.state.proxy.forward(request, api_url, "/api", path)

    @app.api_route("/v1/{path:path}", methods=METHODS, include_in_schema=False)
    async def inference(path: str, request: Request):
        return await request.app.state.proxy.forward(request, inference_url, "/v1", path)

    for name in LIBRARIES:
        app.mount(f"/vendor/{name}", StaticFiles(directory=settings.web_node_modules / name))
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    app.add_middleware(SecurityHeaders, policy=content_security_policy(page))
    return app
