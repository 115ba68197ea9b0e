"""The training run on the model ranks: the trainer and its step, EMA, optimizer and schedule, metrics
and logs, the dry run's memory estimate, and evaluation during training."""
