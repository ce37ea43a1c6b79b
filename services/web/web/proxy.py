"""The reverse proxy that gives the browser one origin: /api/* goes to the API and /v1/* to the model
server. A request's body is read whole, bounded and under a deadline, before the upstream request
opens, so a slow sender holds no upstream connection; open upstream requests are limited per client
and in all, so no client can hold every pooled connection. Uploads (multipart bodies, up to a GiB)
cannot wait in memory: they stream through as they arrive, in a lane of their own with its own limits,
cut off when they stall. Responses stream back without buffering (server-sent events arrive as they
are written), and the upstream request is dropped the moment the browser goes away (a stopped
generation frees its row)."""

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from web.settings import WebSettings

UPLOADS_PER_CLIENT = 1  # the data page sends a folder's files as one upload
# Headers that belong to one connection, not to the request or response they travel with.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


def kept(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.decode("latin-1").lower() not in HOP_BY_HOP]


def proxy_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # The shape both services use for errors, so the UI shows one banner.
    return JSONResponse({"error": {"message": message, "type": "proxy"}}, status, headers=headers)


class BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int, seconds: float) -> bytes:
    """The whole request body, at most `limit` bytes, within `seconds` (TimeoutError after)."""
    body = bytearray()
    async with asyncio.timeout(seconds):
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BodyTooLarge
    return bytes(body)


async def stream_body(request: Request, seconds: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; a pause of more than `seconds` ends it with TimeoutError."""
    chunks = aiter(request.stream())
    while True:
        try:
            async with asyncio.timeout(seconds):
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        yield chunk


class Gate:
    """Counts open upstream requests, per client address and in all."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total, self.per_client = total, per_client
        self.open: Counter[str] = Counter()
        self.count = 0

    def admit(self, client: str) -> JSONResponse | None:
        """Takes a place for `client` (None), or answers why not: at once, since a waiting request
        would hold its browser connection for as long as the streams ahead of it last."""
        if self.open[client] >= self.per_client:
            return proxy_error(429, f"more than {self.per_client} open requests from {client}")
        if self.count >= self.total:
            return proxy_error(503, "the web server is at its limit of open requests", {"Retry-After": "1"})
        self.open[client] += 1
        self.count += 1
        return None

    def release(self, client: str) -> None:
        self.count -= 1
        self.open[client] -= 1
        if not self.open[client]:
            del self.open[client]  # one entry per client with requests open, not per client ever seen


class Relayed(StreamingResponse):
    """An upstream response relayed as it arrives; once sent, or when the browser left mid-stream,
    the upstream side is closed and the client's place given back."""

    def __init__(
        self, upstream: httpx.Response, headers: dict[str, str], release: Callable[[], None]
    ) -> None:
        super().__init__(upstream.aiter_raw(), upstream.status_code, headers)
        self.upstream, self.release = upstream, release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.upstream.aclose()
            self.release()


def proxied_location(location: str, request_url: httpx.URL, upstream: str, prefix: str) -> str:
    """An upstream redirect's target as the browser reaches it: through this server's `prefix`."""
    target = str(request_url.join(location))
    base = f"{upstream}/"
    return f"{prefix}/{target.removeprefix(base)}" if target.startswith(base) else location


class Proxy:
    """The gates and the pooled connections to both services, for the life of the web server."""

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self.gate = Gate(settings.web_max_upstream_requests, settings.web_max_upstream_requests_per_client)
        self.uploads = Gate(settings.web_max_uploads, UPLOADS_PER_CLIENT)
        # A connection for every request the gates let through, so none waits for the pool; no read
        # timeout: a followed log or a long generation may be quiet for minutes.
        connections = settings.web_max_upstream_requests + settings.web_max_uploads
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0, read=None),
            limits=httpx.Limits(max_connections=connections),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def forward(self, request: Request, upstream: str, prefix: str, path: str) -> Response:
        """`prefix`/`path` here is `upstream`/`path` there."""
        if any(segment in (".", "..") for segment in path.split("/")):
            return proxy_error(404, f"{prefix}/{path} is outside {prefix}")  # /v1/../docs would escape
        seconds = self.settings.web_body_timeout_seconds
        # Closing the connection: what is left of the body must not be read as the next request.
        too_slow = proxy_error(408, f"request body too slow (limit: {seconds} s)", {"Connection": "close"})
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            gate, body = self.uploads, stream_body(request, seconds)
        else:
            try:
                gate, body = self.gate, await read_body(request, self.settings.web_max_body_bytes, seconds)
            except BodyTooLarge:
                return proxy_error(413, f"request body over {self.settings.web_max_body_bytes} bytes")
            except TimeoutError:
                return too_slow

        client = request.client.host if request.client else "unknown"
        refusal = gate.admit(client)
        if refusal is not None:
            return refusal
        url = httpx.URL(f"{upstream}/{path}", query=request.url.query.encode())
        outgoing = self.client.build_request(
            request.method, url, headers=kept(request.headers.raw), content=body
        )
        try:
            response = await self.client.send(outgoing, stream=True)
        except TimeoutError:  # an upload that stalled
            gate.release(client)
            return too_slow
        except httpx.HTTPError as error:
            gate.release(client)
            return proxy_error(502, f"{upstream} is unreachable: {error.__class__.__name__}")
        except BaseException:  # cancelled: the place is given back all the same
            gate.release(client)
            raise

        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in kept(response.headers.raw)}
        if "location" in headers:
            headers["location"] = proxied_location(headers["location"], url, upstream, prefix)
        return Relayed(response, headers, lambda: gate.release(client))
