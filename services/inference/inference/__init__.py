"""The model server: OpenAI-compatible chat and text completions over trained checkpoints,
with continuous batching."""
