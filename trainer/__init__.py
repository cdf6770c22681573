"""gannet's engine: config, data streaming, the training loop, checkpoints, logging and the CLI."""
