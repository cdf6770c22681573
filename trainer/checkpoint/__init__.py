"""Checkpoints: atomic, verified folders (store), pickle-free nested state (statefile), DeepSpeed's files loaded without running code (safe_load)."""
