"""The bearer-token check on every route but /health: the same API_TOKEN as the API's."""

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jobs.tokens import token_accepted

from inference.protocol import OpenAIError

bearer = HTTPBearer(auto_error=False, description="API_TOKEN")


def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    given = credentials.credentials if credentials else None
    if not token_accepted(request.app.state.settings.api_token, given):
        raise OpenAIError(
            401,
            "missing or wrong bearer token (Authorization: Bearer <API_TOKEN>)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
