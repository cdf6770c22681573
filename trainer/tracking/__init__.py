"""Where metrics go: metrics.jsonl, W&B and the terminal (tracker); reading back what W&B wrote offline (wandb_files)."""
