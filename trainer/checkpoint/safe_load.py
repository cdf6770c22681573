"""DeepSpeed's engine state, loaded without running code from the checkpoint.

gannet's own files are safetensors + JSON (gannet.trainer.checkpoint.statefile), but each DeepSpeed engine writes its
state with `torch.save`, and `DeepSpeedEngine.load_checkpoint` reads it back through
`TorchCheckpointEngine.load`, which calls `torch.load(..., weights_only=False)`: a plain pickle,
so a crafted checkpoint would run any code it names on resume. Here every `*.pt` file is first
unpickled with torch's restricted unpickler (`weights_only=True`: tensors, containers, numbers and
the few DeepSpeed types listed below, nothing callable beyond them), so a refusal names the file
and what its pickle asked for; then DeepSpeed's own load runs with `TORCH_FORCE_WEIGHTS_ONLY_LOAD`
set, which torch honours over DeepSpeed's explicit `weights_only=False`, so a file swapped after
the check is refused as well, never executed.
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from gannet.trainer.errors import CheckpointError

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def deepspeed_state_types() -> list[type]:
    """The non-tensor types DeepSpeed's ZeRO optimizer state pickles (found by listing the globals
    of real ZeRO 1-3 checkpoints, fp32 and bf16; DynamicLossScaler is fp16's loss scaler). Each is
    plain data: an int enum, a two-int dataclass, loss-scale numbers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def check_torch_file(path: Path) -> None:
    """Unpickle `path` with weights_only=True (tensors memory-mapped, not read); refuse anything more."""
    load_torch_file(path)


def load_torch_file(path: Path) -> Any:
    """What `path` holds, unpickled weights-only (tensors memory-mapped); a clear refusal otherwise."""
    with torch.serialization.safe_globals(deepspeed_state_types()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            raise CheckpointError(
                f"refusing to load {path}: its pickle asks for {_unsafe_globals(path)}, which could run code; "
                f"a DeepSpeed checkpoint holds only tensors and DeepSpeed's own state types") from None
        except Exception as exc:  # truncated, not a torch file: unreadable, and nothing was run
            raise CheckpointError(f"cannot read {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - only for the message
        names = []
    return ", ".join(sorted(names)) or "a callable it may not use"


@contextmanager
def weights_only_loads(folder: Path) -> Iterator[None]:
    """Check every torch file under `folder`, then let the body (DeepSpeed's load) unpickle only
    what the check allows."""
    for path in sorted(folder.rglob("*.pt")):
        check_torch_file(path)
    before = os.environ.get(FORCE)
    os.environ[FORCE] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_state_types()):
            yield
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refusing to load DeepSpeed state from {folder}: {str(exc).splitlines()[0]}") from None
    finally:
        if before is None:
            os.environ.pop(FORCE, None)
        else:
            os.environ[FORCE] = before
