"""`python -m inference`: serve the model server on INFERENCE_HOST:INFERENCE_PORT."""

import uvicorn

from inference.app import create_app
from inference.settings import InferenceSettings


def main() -> None:
    settings = InferenceSettings()
    uvicorn.run(create_app(), host=settings.inference_host, port=settings.inference_port, log_level="info")


if __name__ == "__main__":
    main()
