"""Shared dependencies: settings, the Redis connections, and the bearer-token checks."""

from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jobs.tokens import token_accepted
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from api.config import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_redis(request: Request) -> Redis:
    return request.app.state.redis


def get_async_redis(request: Request) -> AsyncRedis:
    return request.app.state.async_redis


SettingsDep = Annotated[Settings, Depends(get_settings)]
RedisDep = Annotated[Redis, Depends(get_redis)]
AsyncRedisDep = Annotated[AsyncRedis, Depends(get_async_redis)]

bearer = HTTPBearer(auto_error=False, description="API_TOKEN")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def check_token(settings: Settings, credentials: HTTPAuthorizationCredentials | None) -> None:
    # no token is dev mode only: Settings refuses to start without one otherwise
    if not token_accepted(settings.api_token, credentials.credentials if credentials else None):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or wrong bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )


def require_token(settings: SettingsDep, credentials: Credentials) -> None:
    """Routes that change something always need the token."""
    check_token(settings, credentials)


def require_read_token(settings: SettingsDep, credentials: Credentials) -> None:
    """Reads need the token too (logs and configs can hold private data), unless PUBLIC_READ=1."""
    if not settings.public_read:
        check_token(settings, credentials)
