"""Save nested training state (optimizer state, RNG states, counters) without pickle.

`torch.save` checkpoints run arbitrary code when loaded. Here every tensor and numpy array goes
into a safetensors file and the structure around them (dicts with int or str keys, lists, tuples,
numbers, strings, None) into JSON, so loading a checkpoint from elsewhere is always safe.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def save_state(obj: Any, path: Path) -> None:
    """Write `obj` as PATH.json + PATH.safetensors (no fsync; callers make it atomic)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(obj, tensors)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(skeleton))


def load_state(path: Path) -> Any:
    tensors = load_file(str(path.with_suffix(".safetensors")))
    return _decode(json.loads(path.with_suffix(".json").read_text()), tensors)


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"ndarray": key}
    if isinstance(obj, dict):
        return {"dict": [[_encode_key(k), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"tuple" if isinstance(obj, tuple) else "list": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _encode_key(key: Any) -> list:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"cannot store dict key {key!r} in a checkpoint")
    return ["int" if isinstance(key, int) else "str", key]


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict):
        return node
    ((kind, value),) = node.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "ndarray":
        return tensors[value].numpy()
    if kind == "dict":
        return {(int(k) if t == "int" else k): _decode(v, tensors) for (t, k), v in value}
    items = [_decode(v, tensors) for v in value]
    return tuple(items) if kind == "tuple" else items


def nonfinite_entries(obj: Any, path: str = "") -> list[str]:
    """Where a nested state (dicts, lists, tensors, arrays, numbers) holds NaN or Inf: one entry per
    tensor or number, as its dotted path with the count, e.g. `optimizers.G.state.7.exp_avg_sq (776 of
    1024)`. What a checkpoint must never hold: a resumed run would carry it on silently (Adam with
    an infinite second moment freezes those weights: m / sqrt(inf) = 0)."""
    here = path or "(top)"
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point() or obj.numel() == 0:
            return []
        bad = int((~torch.isfinite(obj.detach())).sum())
        return [f"{here} ({bad} of {obj.numel()})"] if bad else []
    if isinstance(obj, np.ndarray):
        return nonfinite_entries(torch.from_numpy(obj), path) if obj.dtype.kind == "f" else []
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [f"{here} ({obj})"]
    if isinstance(obj, dict):
        return [e for key, value in obj.items() for e in nonfinite_entries(value, f"{path}.{key}" if path else str(key))]
    if isinstance(obj, (list, tuple)):
        return [e for i, value in enumerate(obj) for e in nonfinite_entries(value, f"{path}.{i}" if path else str(i))]
    return []
