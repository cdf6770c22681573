"""Stopping for the cluster: a signal asks, all ranks agree on a step, save it, and leave.

Slurm warns a job before its time limit or a preemption with a signal (submitit asks for USR2,
`signal_delay_s` ahead). The handler only sets a flag: a checkpoint is a collective, so it cannot
run inside a signal handler on one rank. The training loop asks `agreed(...)` at steps where it
already synchronises (log steps); that is one tiny all-reduce, and only in processes that
`watch()` for the signal (Slurm jobs), so plain runs never pay for it.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from gannet.trainer.engine.distributed import Engine

_watching = False
_requested = False


def watch(sig: int = signal.SIGUSR2) -> Any:
    """Turn `sig` into a stop request; returns the handler it replaces (submitit's requeue)."""
    global _watching
    _watching = True
    return signal.signal(sig, _request)


def loader_worker_init(worker_id: int) -> None:
    """In a watched process, loader workers ignore SIGTERM. Slurm sends it to every process of a
    preempted job, and torch's worker handler turns it into the worker's death and so the run's,
    before the USR2 that follows can save it. Workers still end with their parent."""
    del worker_id
    if _watching:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _request(signum: int, frame: Any) -> None:
    global _requested
    _requested = True


def requested() -> bool:
    """Whether this process was asked to stop (by its own signal or, after `agreed`, by any rank's)."""
    return _requested


def agreed(engine: Engine) -> bool:
    """True on every rank when any rank was signalled (call on all ranks at the same step)."""
    global _requested
    if not _watching:
        return False
    flag = torch.tensor([float(_requested)], device=engine.device)
    _requested = bool(engine.mean(flag).item() > 0)
    return _requested
