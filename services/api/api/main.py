"""The FastAPI application: settings and Redis on app.state, one router per noun."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from api.config import Settings
from api.routes import health, jobs


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.redis = Redis.from_url(settings.redis_url)
        yield
        app.state.redis.close()

    app = FastAPI(title="nanochat-stack API", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings

    @app.exception_handler(RedisConnectionError)
    async def redis_unavailable(request: Request, error: RedisConnectionError) -> JSONResponse:
        return JSONResponse({"detail": f"Redis is unreachable: {error}"}, status_code=503)

    app.include_router(health.router)
    app.include_router(jobs.router)
    return app
