from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from api.deps import RedisDep

router = APIRouter(tags=["health"])


@router.get("/health")
def health(redis: RedisDep) -> JSONResponse:
    """200 when the API can reach Redis, 503 otherwise."""
    try:
        redis.ping()
    except RedisError as error:
        return JSONResponse({"status": "unavailable", "redis": str(error)}, status_code=503)
    return JSONResponse({"status": "ok", "redis": "ok"})
