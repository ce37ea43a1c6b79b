"""
Loaded models: each with its tokenizer and its scheduler thread, loaded on first use and kept in
least-recently-used order. When the estimated memory of the loaded models (weights plus a full KV
cache) passes INFERENCE_MAX_MODEL_MEMORY_GB, idle models are unloaded, oldest use first; a model
with requests in flight is never unloaded.
"""

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from jobs.models import Checkpoint, resolve

from inference.metrics import Metrics
from inference.scheduler import Scheduler
from inference.settings import InferenceSettings
from trainer.checkpoint import load_model
from trainer.engine import Engine
from trainer.gpt import GPT
from trainer.runtime import setup_runtime
from trainer.tokenizer import Tokenizer

log = logging.getLogger("inference")


@dataclass
class ServedModel:
    checkpoint: Checkpoint
    engine: Engine
    scheduler: Scheduler
    memory_bytes: int

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def context(self) -> int:
        return self.engine.model.config.sequence_len


def memory_estimate(model: GPT, batch_size: int) -> int:
    """Weights plus a KV cache of batch_size rows over the whole context."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    cache = 2 * c.n_layer * batch_size * c.sequence_len * c.n_kv_head * c.head_dim
    return weights + cache * torch.finfo(model.compute_dtype).bits // 8


class ModelPool:
    def __init__(self, settings: InferenceSettings, metrics: Metrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.runtime = setup_runtime(settings.inference_device, settings.inference_dtype)
        self.loaded: OrderedDict[str, ServedModel] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, model: str) -> ServedModel:
        """The served model behind a model id (blocking: loads it when needed; UnknownModel if none)."""
        checkpoint = resolve(self.settings.runs_dir, model, self.settings.inference_default_model)
        with self.lock:
            if checkpoint.id in self.loaded:
                self.loaded.move_to_end(checkpoint.id)
                return self.loaded[checkpoint.id]
            served = self.load(checkpoint)
            self.loaded[checkpoint.id] = served
            self.evict()
            return served

    def load(self, checkpoint: Checkpoint) -> ServedModel:
        log.info("loading %s from %s", checkpoint.id, checkpoint.path)
        device, dtype = self.runtime.device, self.runtime.dtype
        model, _ = load_model(checkpoint.path.parent, checkpoint.step, device, dtype)
        if dtype != torch.float32:
            model.to(dtype)  # no fp32 master weights are needed to serve: half the memory, no casts
        model.eval()
        engine = Engine(model, Tokenizer.load(checkpoint.tokenizer_dir))
        batch = self.settings.inference_max_batch_size
        scheduler = Scheduler(engine, batch, self.settings.inference_max_waiting, self.metrics, checkpoint.id)
        return ServedModel(checkpoint, engine, scheduler, memory_estimate(model, batch))

    def evict(self) -> None:
        budget = self.settings.inference_max_model_memory_gb * 2**30
        for name in list(self.loaded)[:-1]:  # never the model just asked for
            if sum(m.memory_bytes for m in self.loaded.values()) <= budget:
                return
            if self.loaded[name].scheduler.close_if_idle():
                log.info("unloaded %s (memory budget)", name)
                del self.loaded[name]

    @property
    def ready(self) -> bool:
        return any(m.scheduler.has_generated for m in list(self.loaded.values()))

    def close(self) -> None:
        with self.lock:
            for served in self.loaded.values():
                served.scheduler.close()
            self.loaded.clear()
