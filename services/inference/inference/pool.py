"""
Loaded models: each with its tokenizer and its scheduler thread, loaded on first use and kept in
least-recently-used order. When the estimated memory of the loaded models (weights plus the KV cache,
which holds the prefix cache's blocks too) passes INFERENCE_MAX_MODEL_MEMORY_GB, idle models are
unloaded, oldest use first; a model with requests in flight is never unloaded. While a training job
holds the GPU (gpu_share), every model is unloaded and none loads.
"""

import gc
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from jobs.models import Checkpoint, resolve

from inference.gpu_share import GpuShare
from inference.metrics import Metrics
from inference.paged_cache import PagedKVCache
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

    @property
    def kv_positions(self) -> int:
        """Positions the paged KV cache holds: one sequence can grow to this many at most."""
        return self.scheduler.cache.capacity


def memory_estimate(model: GPT, cache: PagedKVCache) -> int:
    """Weights, the paged KV pool (the prefix cache keeps its blocks in it), and the most that one
    layer's keys and values gathered for attention take (kept between forwards on the CPU)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    pool = 2 * cache.keys.numel() * cache.keys.element_size()  # keys and values
    slot = cache.keys[0, 0].numel() * cache.keys.element_size()  # one position's keys in one layer
    return weights + pool + 2 * cache.most_gathered * slot


class ModelPool:
    def __init__(self, settings: InferenceSettings, metrics: Metrics, gpu: GpuShare | None = None) -> None:
        self.settings, self.metrics = settings, metrics
        self.gpu = gpu or GpuShare(None, None, metrics)
        self.runtime = setup_runtime(settings.inference_device, settings.inference_dtype)
        self.cuda_graphs = settings.inference_cuda_graphs and self.runtime.device.type == "cuda"
        if settings.inference_cuda_graphs and not self.cuda_graphs:
            log.warning("INFERENCE_CUDA_GRAPHS is on, but this server runs on the CPU: it is ignored")
        self.loaded: OrderedDict[str, ServedModel] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, model: str) -> ServedModel:
        """The served model behind a model id (blocking: loads it when needed; UnknownModel if none,
        GpuBusy while a training job holds the GPU)."""
        checkpoint = resolve(self.settings.runs_dir, model, self.settings.inference_default_model)
        with self.lock:
            self.gpu.refuse_if_busy()
            if checkpoint.id in self.loaded:
                self.loaded.move_to_end(checkpoint.id)
                return self.loaded[checkpoint.id]
            self.gpu.claim()
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
        settings, batch = self.settings, self.settings.inference_max_batch_size
        scheduler = Scheduler(
            engine,
            batch,
            settings.inference_max_waiting,
            self.metrics,
            checkpoint.id,
            prefix_tokens=settings.inference_prefix_cache_tokens,
            chunk_tokens=settings.inference_prefill_chunk_tokens or None,
            kv_tokens=settings.inference_kv_cache_tokens or None,  # None: the scheduler's default
            decode_graphs=self.cuda_graphs,
        )
        memory = memory_estimate(model, scheduler.cache)
        return ServedModel(checkpoint, engine, scheduler, memory)

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

    @property
    def busy(self) -> bool:
        """Requests are running or waiting on some model."""
        return any(m.scheduler.busy for m in list(self.loaded.values()))

    def unload_all(self, reason: str = "the model was unloaded") -> None:
        """Unload every model (what still runs fails with `reason`) and give its memory back."""
        with self.lock:
            for served in self.loaded.values():
                served.scheduler.close(reason)
            self.loaded.clear()
        gc.collect()  # a model kept alive by a reference cycle goes now, not at some later collection
        if self.runtime.device.type == "cuda":
            torch.cuda.empty_cache()  # back to the driver: a training job may take it
