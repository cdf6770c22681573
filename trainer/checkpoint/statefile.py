"""Save nested training state (optimizer state, RNG states, counters) without pickle.

`torch.save` checkpoints run arbitrary code when loaded. Here every tensor and numpy array goes
into a safetensors file and the structure around them (dicts with int or str keys, lists, tuples,
numbers, strings, None) into JSON, so loading a checkpoint from elsewhere is always safe.
"""

from __future__ import annotations

import json
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
