"""`python -m web`: serve the UI on WEB_HOST:WEB_PORT."""

import uvicorn

from web.app import create_app
from web.settings import WebSettings


def main() -> None:
    settings = WebSettings()
    uvicorn.run(create_app(settings), host=settings.web_host, port=settings.web_port, log_level="info")


if __name__ == "__main__":
    main()
