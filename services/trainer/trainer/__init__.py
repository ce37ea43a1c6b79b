"""nanochat-stack's ML core: tokenizer, data, model, optimizers and the training/eval programs."""
