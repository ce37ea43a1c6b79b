"""`python -m api`: serve the API on API_HOST:API_PORT; refuses to start without API_TOKEN."""

import sys

import uvicorn
from pydantic import ValidationError

from api.config import Settings
from api.main import create_app


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as error:
        reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
        sys.exit(f"api: refusing to start: {reasons}")
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level="info")


if __name__ == "__main__":
    main()
