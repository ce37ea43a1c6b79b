"""The FastAPI application: settings and Redis on app.state, body-size limits (413; uploads have their own),
one router per noun."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api import streams
from api.config import Settings
from api.routes import files, health, jobs, models, workers

REDIS_TIMEOUT_SECONDS = 5  # a Redis that went away makes requests fail fast (503), not hang


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    timeouts = {"socket_timeout": REDIS_TIMEOUT_SECONDS, "socket_connect_timeout": REDIS_TIMEOUT_SECONDS}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = Redis.from_url(settings.redis_url, **timeouts)
        # Followers block in XREAD for up to streams.BLOCK_MS: the read timeout must outlast that. Each
        # admitted follower holds one connection while it waits (redis-py's pool stops at 100 by default).
        app.state.async_redis = AsyncRedis.from_url(
            settings.redis_url,
            socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
            socket_timeout=streams.BLOCK_MS / 1000 + REDIS_TIMEOUT_SECONDS,
            max_connections=settings.api_max_followers,
        )
        app.state.followers = streams.Followers(
            settings.api_max_followers_per_job, settings.api_max_followers
        )
        yield
        app.state.redis.close()
        await app.state.async_redis.aclose()

    app = FastAPI(
        title="nanochat-stack API",
        version="0.2.0",
        lifespan=lifespan,
        max_body_size=settings.api_max_body_bytes,
        # No docs pages: FastAPI's load unpinned scripts from a CDN, and through the web server they
        # would run on the origin whose localStorage holds the token. The schema stays, for tools.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def redis_unavailable(request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"Redis is unreachable: {error}"}, status_code=503)

    @app.exception_handler(OutOfMemoryError)  # what is still refused after the routes' retries
    async def redis_full(request: Request, error: Exception) -> JSONResponse:
        detail = f"Redis is out of memory ({error}): try again later, or raise REDIS_MAXMEMORY"
        return JSONResponse({"detail": detail}, status_code=503)

    app.include_router(health.router)
    app.include_router(jobs.router)
    app.include_router(models.router)
    app.include_router(workers.router)
    app.include_router(files.router, max_body_size=settings.api_max_upload_bytes)  # uploads are larger
    return app
