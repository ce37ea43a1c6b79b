"""`python -m api`: serve the API on API_HOST:API_PORT; refuses to start without API_TOKEN."""

import sys

import uvicorn
from jobs.redaction import hide_secrets, settings_error
from pydantic import ValidationError

from api.config import Settings
from api.main import create_app


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as error:
        sys.exit(f"api: refusing to start: {settings_error(error)}")
    hide_secrets(settings.api_token, settings.redis_url)
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_level="info")


if __name__ == "__main__":
    main()
