"""Shared fixtures: real MNIST shards (the bundled digits) and a `gannet` subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.shards import bundled_mnist, labelled_images, write_mnist_shards, write_split

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory) -> Path:
    """The real shard set `make train` uses: 9 train shards of 500 digits, 1 val shard."""
    out = tmp_path_factory.mktemp("mnist")
    write_mnist_shards(out)
    return out


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """6 shards x 100 real digits: small enough that a test sees whole epochs."""
    out = tmp_path_factory.mktemp("small")
    pixels, labels = bundled_mnist()
    index = np.random.default_rng(1).permutation(len(pixels))[:600]
    write_split(labelled_images(pixels, labels, index), out, "train", 100)
    return out


def tiny_overrides(shards: Path, run_dir: Path, **extra: object) -> list[str]:
    """A small, fast LSGAN config on real shards (narrow nets, W&B off unless asked)."""
    values = {
        "data.shards": f"{shards}/train-*.tar", "data.batch_size": 32, "data.num_workers": 1,
        "model.g_width": 16, "model.d_width": 16, "train.steps": 30, "train.log_every": 5,
        "train.sample_every": 15, "train.checkpoint_every": 15, "log.wandb": "disabled", "run_dir": str(run_dir),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def without_perf(rows: list[dict]) -> list[dict]:
    """Metrics records minus timings: what two runs of the same computation must share exactly."""
    return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]


def gannet(*args: str, check: bool = True, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m trainer ...`) in a fresh process from the repo root."""
    # One math thread per process: a run is a trainer plus a loader worker on a 2-core machine, and
    # oversubscribed OpenMP threads made small CPU runs many times slower (measured, see README).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"gannet {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result
