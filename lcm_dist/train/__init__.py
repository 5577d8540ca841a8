"""Training: run setup, the step and the loop, checkpoints, logging."""
