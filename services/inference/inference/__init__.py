"""The chat model server (OpenAI-compatible /v1/chat/completions arrives with the inference issue)."""
