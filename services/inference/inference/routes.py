"""The HTTP routes: thin, the work is in completions.py, the scheduler and the pool."""

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from jobs.models import UnknownModel, model_ids
from prometheus_client import generate_latest
from starlette.concurrency import run_in_threadpool

from inference.auth import require_token
from inference.completions import ChatCompletion, TextCompletion, chat_prompt, text_prompt
from inference.gpu_share import GpuBusy
from inference.pool import ModelPool, ServedModel
from inference.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    OpenAIError,
    TokenizeRequest,
)
from trainer.chat_format import CHAT_TEMPLATE

public = APIRouter()
router = APIRouter(dependencies=[Depends(require_token)])
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
GPU_BUSY_RETRY_AFTER = "60"  # a training job runs for minutes to hours


def get_pool(request: Request) -> ModelPool:
    return request.app.state.pool


PoolDep = Annotated[ModelPool, Depends(get_pool)]


async def served_model(pool: ModelPool, model: str) -> ServedModel:
    try:
        return await run_in_threadpool(pool.get, model)
    except UnknownModel as error:
        raise OpenAIError(404, str(error), param="model", code="model_not_found") from error
    except GpuBusy as error:
        retry = {"Retry-After": GPU_BUSY_RETRY_AFTER}
        raise OpenAIError(503, str(error), type="server_error", code="gpu_busy", headers=retry) from error


@public.get("/health")
def health() -> dict:
    """Liveness: the process answers (no model needs to be loaded)."""
    return {"status": "ok"}


@router.get("/ready")
def ready(pool: PoolDep) -> JSONResponse:
    """Readiness: a model is loaded and has generated a token (not while a training job has the GPU)."""
    if pool.gpu.job is not None:
        return JSONResponse({"status": "paused", "job": pool.gpu.job}, status_code=503)
    if pool.ready:
        return JSONResponse({"status": "ready", "models": list(pool.loaded)})
    return JSONResponse({"status": "loading"}, status_code=503)


@router.get("/metrics")
def metrics(request: Request) -> PlainTextResponse:
    body = generate_latest(request.app.state.metrics.registry)
    return PlainTextResponse(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/v1/models")
def list_models(pool: PoolDep) -> dict:
    ids = model_ids(pool.settings.runs_dir, pool.settings.inference_default_model)
    data = [
        {"id": name, "object": "model", "created": c.created, "owned_by": c.run, "root": c.id}
        for name, c in ids.items()
    ]
    return {"object": "list", "data": data}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, pool: PoolDep
) -> dict | StreamingResponse:
    served = await served_model(pool, body.model)
    completion = ChatCompletion(served, body, pool.settings.inference_max_messages)
    if body.stream:
        chunks = await completion.stream(request)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    return await completion.response(request)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, pool: PoolDep) -> dict | StreamingResponse:
    served = await served_model(pool, body.model)
    completion = TextCompletion(served, body)
    if body.stream:
        chunks = await completion.stream(request)
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    return await completion.response(request)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, pool: PoolDep) -> dict:
    served = await served_model(pool, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise OpenAIError(400, "give exactly one of `prompt` and `messages`", param="prompt")
    if body.messages is not None:
        tokens = chat_prompt(served, body, pool.settings.inference_max_messages, body.add_generation_prompt)
    else:
        tokens = text_prompt(served, body.prompt, add_bos=body.add_special_tokens)
    return {"count": len(tokens), "max_model_len": served.context, "tokens": tokens}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, pool: PoolDep) -> dict:
    served = await served_model(pool, body.model)
    return {"prompt": served.tokenizer.decode(text_prompt(served, body.tokens))}


@router.get("/tokenizer_info")
async def tokenizer_info(pool: PoolDep, model: str = "default") -> dict:
    served = await served_model(pool, model)
    return {
        "tokenizer_class": "tiktoken",
        "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>",
        "pad_token": "<|bos|>",
        "model_max_length": served.context,
        "vocab_size": served.tokenizer.vocab_size,
        "chat_template": CHAT_TEMPLATE,
    }
