"""`python -m inference`: serve the model server on INFERENCE_HOST:INFERENCE_PORT."""

import logging
import os
import sys

import uvicorn
from jobs.gpu_claims import PCI_BUS_ID
from jobs.redaction import hide_secrets, settings_error
from pydantic import ValidationError

from inference.app import create_app
from inference.gpu_share import serving_devices
from inference.settings import InferenceSettings


def main() -> None:
    try:
        settings = InferenceSettings()
    except ValidationError as error:
        sys.exit(f"inference: refusing to start: {settings_error(error)}")
    hide_secrets(settings.api_token, settings.redis_url)
    # Before anything touches CUDA, which reads these once: its GPU ids are then nvidia-smi's (those of
    # INFERENCE_GPUS and WORKER_GPUS), and it sees the GPU the server serves on first.
    os.environ["CUDA_DEVICE_ORDER"] = PCI_BUS_ID
    devices = serving_devices(settings.inference_gpus)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings), host=settings.inference_host, port=settings.inference_port, log_level="info"
    )


if __name__ == "__main__":
    main()
