"""Engine: the trainer, evaluation loop, checkpoints, distributed set-up and run records."""
