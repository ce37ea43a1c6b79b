"""FastAPI control plane for nanochat-stack: jobs, logs, models."""
