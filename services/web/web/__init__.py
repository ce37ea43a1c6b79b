"""The browser UI for nanochat-stack and the small server that serves it."""
