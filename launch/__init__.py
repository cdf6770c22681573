"""Launchers: Accelerate/DeepSpeed presets and cluster (Slurm/submitit) entry points.

Training code never depends on this package; it only holds ways to start `python -m gannet`.
"""
