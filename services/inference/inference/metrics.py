"""Prometheus metrics of the model server (GET /metrics), in a registry of the app's own."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "inference_requests",
            "Finished requests by route and HTTP status.",
            ["route", "status"],
            registry=r,
        )
        self.rejected = Counter(
            "inference_rejected_requests", "Requests refused with 429 because the queue was full.", registry=r
        )
        self.prompt_tokens = Counter(
            "inference_prompt_tokens", "Prompt tokens (prefilled or found in the prefix cache).", registry=r
        )
        self.prefix_cache_queries = Counter(
            "inference_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_cache_hits = Counter(
            "inference_prefix_cache_hits",
            "Prompt tokens found in the prefix cache, not prefilled again (hit rate: hits / queries).",
            registry=r,
        )
        self.prefix_cache_blocks = Gauge(
            "inference_prefix_cache_blocks",
            "KV cache blocks named by the prefix cache: kept for reuse, or shared by running sequences.",
            ["model"],
            registry=r,
        )
        self.prefix_cache_tokens = Gauge(
            "inference_prefix_cache_tokens",
            "Token positions in the blocks the prefix cache names.",
            ["model"],
            registry=r,
        )
        self.kv_cache_used_blocks = Gauge(
            "inference_kv_cache_used_blocks",
            "Blocks of the paged KV cache held by running sequences and prompts being prefilled (of "
            "INFERENCE_KV_CACHE_TOKENS / 16).",
            ["model"],
            registry=r,
        )
        self.preemptions = Counter(
            "inference_preemptions",
            "Sequences taken out of the batch, or prompts out of their prefill, when the KV cache ran out of "
            "blocks, to be prefilled again.",
            registry=r,
        )
        self.generation_tokens = Counter("inference_generation_tokens", "Tokens generated.", registry=r)
        self.waiting = Gauge(
            "inference_queue_depth", "Requests waiting for a batch slot.", ["model"], registry=r
        )
        self.running = Gauge(
            "inference_running_sequences", "Sequences in the running batch.", ["model"], registry=r
        )
        self.paused = Gauge(
            "inference_paused",
            "1 while a training job holds the model server's GPU (models unloaded, requests get 503).",
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "inference_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "inference_time_per_output_token_seconds",
            "Between consecutive tokens of a sequence.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
