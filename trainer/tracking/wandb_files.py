"""Read back what a W&B run wrote to its local transaction log (`run-<id>.wandb`).

The tracker uses it on resume (which steps did earlier attempts of this run already persist?),
and the tests to assert on what W&B received.

Each ``wandb.init(mode="offline", dir=D, ...)`` writes a fresh directory
``D/wandb/offline-run-<YYYYmmdd_HHMMSS>-<id>[-N]/`` holding ``run-<id>.wandb``
(resuming the same id creates another directory, not an append). That file is
a 7-byte W&B header (``b":W&B"``, magic ``0xBEE1`` as little-endian uint16,
version byte 0) followed by LevelDB-log chunks in 32 KiB blocks (the header
counts towards the first block; a block tail shorter than a chunk header is
zero padding). Each chunk has a 7-byte header: CRC-32 (zlib/IEEE, not crc32c,
unmasked) of type byte + payload, payload length (uint16 LE), type byte.
Reassembled records are serialized ``wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

_FILE_HEADER = struct.Struct("<4sHB")
_FILE_HEADER_VALUE = (b":W&B", 0xBEE1, 0)
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK_SIZE = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _run_dirs(run_dir: str | Path) -> list[Path]:
    """Run directories under ``run_dir/wandb/`` (skipping the latest-run symlink)."""
    root = Path(run_dir, "wandb")
    if not root.is_dir():
        return []
    return [d for d in root.iterdir() if d.is_dir() and not d.is_symlink()]


def find_run_files(run_dir: str | Path, run_id: str = "*") -> list[Path]:
    """The ``run-<run_id>.wandb`` files under ``run_dir/wandb/`` (any id by default), oldest first (by mtime)."""
    files = [f for d in _run_dirs(run_dir) for f in d.rglob(f"run-{run_id}.wandb")]
    return sorted(files, key=lambda p: p.stat().st_mtime)


def persisted_step(run_dir: str | Path, run_id: str) -> int:
    """The last step any earlier attempt of run `run_id` got onto disk (0 if none).

    W&B writes its log in 32 KiB blocks, so a killed process loses its unwritten tail: this is
    what actually survived, not what was sent."""
    return max((row["_step"] for f in find_run_files(run_dir, run_id) for row in read_history(f) if "_step" in row), default=0)


def _iter_raw_records(data: bytes) -> Iterator[bytes]:
    """Yield the payload of each complete record; a truncated tail is dropped."""
    header = _FILE_HEADER.unpack_from(data)
    if header != _FILE_HEADER_VALUE:
        raise ValueError(f"not a W&B transaction log (header {header!r})")
    pos, pending = _FILE_HEADER.size, None
    while True:
        if _BLOCK_SIZE - pos % _BLOCK_SIZE < _CHUNK_HEADER.size:
            pos += _BLOCK_SIZE - pos % _BLOCK_SIZE
        if pos + _CHUNK_HEADER.size > len(data):
            return
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start = pos + _CHUNK_HEADER.size
        if start + length > len(data):
            return
        if zlib.crc32(data[start - 1 : start + length]) != crc:
            raise ValueError(f"CRC mismatch in chunk at offset {pos}")
        chunk, pos = data[start : start + length], start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += chunk
            if kind == _LAST:
                yield pending
                pending = None
        else:
            offset = start - _CHUNK_HEADER.size
            raise ValueError(f"unexpected chunk type {kind} at offset {offset}")


def read_records(wandb_file: str | Path) -> list[wandb_internal_pb2.Record]:
    """All protobuf ``Record`` messages stored in a ``.wandb`` file, in order."""
    records = []
    for raw in _iter_raw_records(Path(wandb_file).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def read_history(wandb_file: str | Path) -> list[dict[str, Any]]:
    """One dict per history record: key -> JSON-decoded value.

    Nested keys (e.g. from ``{"a": {"b": 1}}``) are joined with "/"; keys that
    already contain "/" (``"train/loss"``) are kept as-is. Rows include wandb's
    own ``_step``, ``_timestamp`` and ``_runtime``.
    """
    return [
        {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item
        }
        for record in read_records(wandb_file)
        if record.WhichOneof("record_type") == "history"
    ]


def read_media_files(run_dir: str | Path) -> list[Path]:
    """PNG files under ``run_dir/wandb/*/files/media/``, sorted by path."""
    media_dirs = [d / "files" / "media" for d in _run_dirs(run_dir)]
    return sorted(png for media in media_dirs for png in media.rglob("*.png"))
