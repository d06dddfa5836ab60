"""Training: both engines and hooks, checkpoints, evaluation, export, env report, launching."""
