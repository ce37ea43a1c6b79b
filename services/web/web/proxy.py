"""The reverse proxy that gives the browser one origin: /api/* goes to the API and /v1/* to the model
server, streamed both ways without buffering (server-sent events arrive as they are written), and the
upstream request is dropped the moment the browser goes away (a stopped generation frees its row)."""

from collections.abc import AsyncIterator

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

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


def upstream_client() -> httpx.AsyncClient:
    # No read timeout: a followed log or a long generation may be quiet for minutes.
    return httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None), follow_redirects=False)


def kept(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.decode("latin-1").lower() not in HOP_BY_HOP]


async def forward(client: httpx.AsyncClient, upstream: str, path: str, request: Request) -> StreamingResponse:
    url = httpx.URL(f"{upstream.rstrip('/')}/{path}", query=request.url.query.encode())
    outgoing = client.build_request(
        request.method, url, headers=kept(request.headers.raw), content=request.stream()
    )
    try:
        response = await client.send(outgoing, stream=True)
    except httpx.HTTPError as error:
        return JSONResponse(  # the shape both services use for errors, so the UI shows one banner
            {"error": {"message": f"{upstream} is unreachable: {error.__class__.__name__}", "type": "proxy"}},
            status_code=502,
        )

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        finally:  # also when the browser left mid-stream: close the upstream side at once
            await response.aclose()

    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in kept(response.headers.raw)}
    return StreamingResponse(body(), status_code=response.status_code, headers=headers)
