"""The model server's app: settings, the model pool, auth, CORS, OpenAI-shaped errors, metrics."""

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from jobs.models import UnknownModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference.gpu_share import GpuBusy, GpuShare
from inference.metrics import Metrics
from inference.pool import ModelPool
from inference.protocol import OpenAIError
from inference.routes import public, router
from inference.scheduler import Output, SamplingParams, Submission
from inference.settings import InferenceSettings

log = logging.getLogger("inference")


async def warm_up(pool: ModelPool) -> None:
    """Load the default model and generate one token, so /ready turns 200 before the first user."""
    try:
        served = await run_in_threadpool(pool.get, "default")
    except UnknownModel:
        log.warning(
            "no checkpoint to serve yet under %s: /ready stays 503 until one is written and asked for",
            pool.settings.runs_dir,
        )
        return
    except GpuBusy as busy:
        log.warning("training job %s holds the GPU: models load once it has ended", busy.job)
        return
    submission = Submission([served.tokenizer.bos_token_id], SamplingParams(max_tokens=1, temperature=0))
    served.scheduler.submit([submission])
    while not isinstance(event := await submission.events.get(), Output) or event.finish_reason is None:
        pass
    log.info("ready: %s generated its first token", served.checkpoint.id)


class LimitAndCount:
    """Refuses a body over the limit in OpenAI's error shape: at once when its Content-Length says so,
    else as soon as the bytes read pass it (a chunked body). Counts requests by route and status as
    their responses start. Plain ASGI, so streamed responses pass through untouched (an
    `@app.middleware` would relay every chunk through a task)."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics
        self.too_large = f"request body over {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = scope.get("route")
                path = route.path if route is not None else "unmatched"
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        size = dict(scope["headers"]).get(b"content-length", b"0")
        if not size.isdigit() or int(size) > self.max_bytes:
            return await error_response(OpenAIError(413, self.too_large))(scope, receive, counted)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # raised inside the body read: the 413 handler shapes it
                raise HTTPException(413, self.too_large)
            return message

        await self.app(scope, limited, counted)


def error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(settings: InferenceSettings | None = None) -> FastAPI:
    settings = settings or InferenceSettings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gpu = GpuShare.from_settings(settings, metrics)
        pool = app.state.pool = ModelPool(settings, metrics, gpu)
        stop_watching = gpu.watch(lambda: pool.busy, pool.unload_all)
        task = asyncio.create_task(warm_up(pool))
        yield
        task.cancel()
        stop_watching()
        pool.unload_all()
        gpu.release()

    # No docs pages (scripts from a CDN, as in the API); the schema stays at /openapi.json.
    app = FastAPI(
        title="nanochat-stack inference", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.settings, app.state.metrics = settings, metrics
    app.include_router(public)
    app.include_router(router)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type"],
    )

    app.add_middleware(LimitAndCount, max_bytes=settings.inference_max_request_bytes, metrics=metrics)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first["loc"] if part != "body"]
        param = location[0] if location else None
        message = f"{'.'.join(location) or 'body'}: {first['msg']}"
        return error_response(OpenAIError(400, message, param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(OpenAIError(error.status_code, str(error.detail), headers=error.headers))

    return app
