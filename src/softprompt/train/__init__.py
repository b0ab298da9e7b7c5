"""Training: the run configuration, the loop (set-up, one loop, clean-up), checkpoints, many processes, search."""
