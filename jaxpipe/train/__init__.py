"""A training run: the trainer, optimizer, evaluation, checkpoints."""
