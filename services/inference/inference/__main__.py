"""`python -m inference`: serve the model server on INFERENCE_HOST:INFERENCE_PORT."""

import logging
import os

import uvicorn

from inference.app import create_app
from inference.settings import InferenceSettings


def main() -> None:
    settings = InferenceSettings()
    if settings.inference_gpus is not None:  # before anything touches CUDA, which reads it once
        os.environ["CUDA_VISIBLE_DEVICES"] = settings.inference_gpus
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings), host=settings.inference_host, port=settings.inference_port, log_level="info"
    )


if __name__ == "__main__":
    main()
