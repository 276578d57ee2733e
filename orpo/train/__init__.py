"""Training: the loop, its state, logs, signals, checkpoints and the training-curve plot."""
