"""The bearer-token check on every route but /health: the same API_TOKEN as the API's."""

import secrets
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from inference.protocol import OpenAIError

bearer = HTTPBearer(auto_error=False, description="API_TOKEN")


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    token = request.app.state.settings.api_token
    if token is None:  # DEV_MODE without a token
        return
    given = credentials.credentials.encode() if credentials else b""
    if not secrets.compare_digest(given, token.get_secret_value().encode()):
        raise OpenAIError(
            401,
            "missing or wrong bearer token (Authorization: Bearer <API_TOKEN>)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
