"""Training: the run config, the jitted step, the loop, checkpoints, RETROfit,
the memory plan and the metrics."""
