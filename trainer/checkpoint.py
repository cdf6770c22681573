"""Atomic, pickle-free checkpoints: RUN/checkpoints/step-00001234/.

A checkpoint is a folder. Every rank writes into `.tmp-step-N/` (rank 0 the shared state: network
weights as safetensors, optimizers, schedulers, counters; each rank its own RNG states and data
position), then rank 0 fsyncs and renames it to `step-N`. A rename is atomic, so a `step-*`
folder is always complete: a run killed mid-save, or a full disk, leaves the previous checkpoint
as the latest. Only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.errors import GannetError
from trainer.statefile import load_state, save_state

STEP_DIR = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """Every RNG the training process draws from (loader workers are seeded by position)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    rank: int,
    barrier: Callable[[], None],
    weights: dict[str, dict[str, torch.Tensor]],
    shared: dict[str, Any],
    per_rank: dict[str, Any],
    keep: int,
    write_files: Callable[[Path], None] = lambda tmp: None,
) -> Path:
    """Write checkpoint `step` from every rank (all ranks must call this together).

    `write_files(tmp)` runs on every rank, for state that writes itself (DeepSpeed engines)."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        if rank == 0:
            for name, tensors in weights.items():
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
            save_state(shared, tmp / "shared")
        save_state(per_rank, tmp / f"rank{rank}")
        write_files(tmp)
        for path in tmp.rglob("*"):
            if path.is_file() and (path.name.startswith(f"rank{rank}.") or rank == 0):
                _fsync(path)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"the latest complete checkpoint ({previous}) is intact" if previous else "no earlier checkpoint exists"
        raise GannetError(f"could not write checkpoint {final}: {getattr(exc, 'strerror', None) or exc}; {kept}") from None
    barrier()
    if rank == 0:
        if final.exists():  # the same step saved again after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any] | None]:
    """(weights per network, shared state, this rank's state or None if the run had fewer ranks)."""
    shared = load_state(path / "shared")
    weights = {name: load_file(str(path / f"{name}.safetensors")) for name in shared["networks"]}
    own = path / f"rank{rank}.json"
    return weights, shared, load_state(path / f"rank{rank}") if own.exists() else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
