"""The shared GPT core: model, tokenizers, data shards, tasks, trainer, checkpoints."""
