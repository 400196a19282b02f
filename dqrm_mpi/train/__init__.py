"""Training loop, evaluation metrics, run directory and checkpoints."""
