"""`gannet shards images DIR`: a folder of the user's own photos -> WebDataset shards at N px.

What a user has is a folder of photos, perhaps one subfolder per class, at mixed sizes and
formats, with a few files that are not photos at all. This turns it into the shards every other
kind writes (`KEY.jpg|png` + `KEY.cls`), the way StyleGAN's and R3GAN's `dataset_tool.py` do:

- Labels: one first-level subfolder per class (torchvision's `ImageFolder`: class index = position
  of the folder's name in sorted order; deeper folders belong to their first-level one), StyleGAN's
  `dataset.json` (`{"labels": [["dir/img.png", 3], ...]}`) when present, or none. The names and
  counts go to `classes.json` beside the shards (`gannet sample --label NAME` reads it).
- Every image kind Pillow reads (JPEG, PNG, WebP, BMP, TIFF, GIF's first frame), EXIF orientation
  applied, modes L/LA/P/RGB/RGBA/CMYK/16-bit brought to `--channels`; transparency composited on
  `--background`.
- `--transform` as StyleGAN's tool: center-crop (default), center-crop-wide (2:1 in a square),
  pad (the whole image, bars of `--background`), stretch.
- Files that are not readable images (empty, truncated, text, hidden) are skipped, counted and
  listed (`skipped.txt` beside the shards); the run never stops on one.
- `--workers K` decode and encode in K processes; results come back in input order, so the bytes
  are the same whatever K (tar headers carry a fixed mtime). Shards are written into a temporary
  folder and moved into place when all are done (`shards.publish`): an interrupted conversion leaves
  nothing half-written, and a rerun writes the same bytes.
"""

from __future__ import annotations

import io
import itertools
import json
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
from PIL import Image, ImageColor, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from gannet.trainer.data.shards import publish, write_split
from gannet.trainer.errors import ConfigError

TRANSFORMS = ("center-crop", "center-crop-wide", "pad", "stretch")
FORMATS = ("jpg", "png", "keep")
LABELS = ("auto", "folders", "dataset.json", "none")
METADATA = {"dataset.json", "classes.json", "skipped.txt"}  # files of a dataset folder that are not images
SHARD_MTIME = 0  # tar header time of every member: the same bytes on every run
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit grey (Pillow reads 16-bit PNGs as I or I;16)
KEPT_AS_IS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats the loader reads as they are


@dataclass(frozen=True)
class ImageOptions:
    """How each image becomes a sample (the same for every worker process)."""

    size: int
    transform: Literal["center-crop", "center-crop-wide", "pad", "stretch"] = "center-crop"
    format: Literal["jpg", "png", "keep"] = "jpg"
    quality: int = 95
    channels: int = 3
    background: tuple[int, int, int] = (0, 0, 0)

    def validate(self) -> None:
        if self.size < 8:
            raise ConfigError(f"--size {self.size} must be >= 8 (the side of the square images to write)")
        if self.transform not in TRANSFORMS:
            raise ConfigError(f"--transform {self.transform!r} is not one of: {', '.join(TRANSFORMS)}")
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format!r} is not one of: {', '.join(FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"--quality {self.quality} must be in [1, 100] (JPEG quality)")
        if self.channels not in (1, 3):
            raise ConfigError(f"--channels {self.channels} must be 1 (grey) or 3 (RGB)")
        if self.format == "keep" and self.transform != "center-crop":
            raise ConfigError("--format keep stores images uncropped and the loader center-crops them at training time: "
                              "use --transform center-crop, or --format jpg|png to apply another transform now")


def parse_background(text: str) -> tuple[int, int, int]:
    """`--background`: a colour name or #rrggbb, as Pillow reads it."""
    try:
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise ConfigError(f"--background {text!r} is not a colour (a name such as white, or #rrggbb)") from None


@dataclass
class Found:
    """The folder as scanned: image candidates (relative path, class or -1), class names, and the
    files already known not to be images (relative path, why)."""

    files: list[tuple[str, int]]
    classes: list[str]
    skipped: list[tuple[str, str]]
    layout: str


def scan(root: Path, labels: str = "auto") -> Found:
    """Every file under ROOT in sorted path order, labelled by the chosen layout (see the module docstring)."""
    if not root.is_dir():
        raise ConfigError(f"image folder not found: {root}")
    if labels not in LABELS:
        raise ConfigError(f"--labels {labels!r} is not one of: {', '.join(LABELS)} (for images)")
    paths, skipped = walk(root)
    if labels == "auto":
        labels = ("dataset.json" if (root / "dataset.json").is_file()
                  else "folders" if any("/" in p for p in paths) else "none")
    if labels == "none":
        return Found([(p, -1) for p in paths], [], skipped, "none")
    if labels == "dataset.json":
        return _stylegan_labels(root, paths, skipped)
    classes = sorted({p.split("/", 1)[0] for p in paths if "/" in p})
    index = {name: i for i, name in enumerate(classes)}
    files = [(p, index[p.split("/", 1)[0]]) for p in paths if "/" in p]
    skipped += [(p, "not in a class folder") for p in paths if "/" not in p]
    return Found(files, classes, sorted(skipped), "folders")


def walk(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative POSIX paths of the visible files under ROOT (sorted), and the hidden ones (a hidden
    folder such as .git is one entry, not its contents). Metadata files at the top are neither."""
    paths, skipped = [], []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        skipped += [((rel / d).as_posix() + "/", "hidden folder") for d in dirs if d.startswith(".")]
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = (rel / name).as_posix()
            if name.startswith("."):
                skipped.append((path, "hidden file"))
            elif not (rel == Path(".") and name in METADATA):
                paths.append(path)
    return sorted(paths), skipped


def _stylegan_labels(root: Path, paths: list[str], skipped: list[tuple[str, str]]) -> Found:
    """StyleGAN's dataset.json: {"labels": [[relative path, class], ...]} or {"labels": null}."""
    source = root / "dataset.json"
    try:
        entries = json.loads(source.read_text()).get("labels")
        table = {str(p).replace("\\", "/"): label for p, label in (entries or [])}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise ConfigError(f"{source} is not StyleGAN's dataset.json ({type(exc).__name__}: {exc})") from None
    if entries is None:
        return Found([(p, -1) for p in paths], [], skipped, "dataset.json (no labels)")
    bad = next((p for p, label in table.items() if isinstance(label, bool) or not isinstance(label, int) or label < 0), None)
    if bad is not None:
        raise ConfigError(f"{source}: the label of {bad} is {table[bad]!r}; gannet trains on class labels (integers >= 0)")
    files = [(p, table[p]) for p in paths if p in table]
    skipped += [(p, "no label in dataset.json") for p in paths if p not in table]
    classes = [str(i) for i in range(max(table.values(), default=-1) + 1)]
    return Found(files, classes, sorted(skipped), "dataset.json")


# -- one image ------------------------------------------------------------------------------------

def convert_file(job: tuple[str, str, ImageOptions]) -> tuple[dict[str, bytes] | None, str, bool]:
    """(fields, "", upscaled) for a readable image, (None, why, False) for anything else. Runs in
    the worker processes: a pure function of the file's bytes and the options."""
    root, rel, opts = job
    try:
        data = (Path(root) / rel).read_bytes()
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})", False
    if not data:
        return None, "empty file", False
    try:
        fields, upscaled = encode(data, opts)
        return fields, "", upscaled
    except UnidentifiedImageError:
        return None, "not an image", False
    except Image.DecompressionBombError as exc:
        return None, f"too large ({exc})", False
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # Pillow's ways of saying "damaged"
        return None, f"damaged or truncated ({' '.join(str(exc).split())[:100]})", False


def encode(data: bytes, opts: ImageOptions) -> tuple[dict[str, bytes], bool]:
    """One image file's bytes -> ({ext: encoded bytes}, whether it was smaller than --size)."""
    with Image.open(io.BytesIO(data)) as img:
        img.seek(0)  # GIF / animated PNG / WebP: the first frame
        if opts.format == "keep" and _readable_as_is(img, opts):
            img.draft(None, (opts.size, opts.size))
            img.load()  # the whole file decodes (a truncated one raises here), at a reduced scale if JPEG
            return {KEPT_AS_IS[img.format]: data}, min(img.size) < opts.size
        img.draft(None, (2 * opts.size, 2 * opts.size))  # JPEG: decode at 1/2-1/8 scale, still >= 2x the target
        upright = ImageOps.exif_transpose(img)  # loads; rotates/mirrors by the EXIF orientation tag
    upscaled = min(upright.size) < opts.size if opts.transform.startswith("center-crop") else max(upright.size) < opts.size
    square = transform(to_channels(upright, opts), opts)
    buf = io.BytesIO()
    if opts.format == "jpg":
        square.save(buf, format="JPEG", quality=opts.quality)
        return {"jpg": buf.getvalue()}, upscaled
    square.save(buf, format="PNG")
    return {"png": buf.getvalue()}, upscaled


def _readable_as_is(img: Image.Image, opts: ImageOptions) -> bool:
    """Whether the loader decodes this file to what a conversion would: a JPEG, PNG or WebP, upright,
    8-bit grey or RGB without transparency (the loader converts between those two itself)."""
    return (img.format in KEPT_AS_IS and img.mode in ("L", "RGB") and "transparency" not in img.info
            and not getattr(img, "is_animated", False) and img.getexif().get(0x0112, 1) == 1)


def to_channels(img: Image.Image, opts: ImageOptions) -> Image.Image:
    """Any mode -> L or RGB: 16-bit grey scaled to 8 bits, transparency composited on the background."""
    if img.mode in SIXTEEN_BIT:
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif img.mode == "F":
        img = img.convert("L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*opts.background, 255))
        canvas.alpha_composite(rgba)
        img = canvas
    target = "L" if opts.channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def transform(img: Image.Image, opts: ImageOptions) -> Image.Image:
    """--transform to an N x N image (LANCZOS, as StyleGAN's dataset tool)."""
    n, (w, h) = opts.size, img.size
    if opts.transform == "stretch":
        return img if img.size == (n, n) else img.resize((n, n), Image.LANCZOS)
    if opts.transform == "center-crop":
        side = min(w, h)
        box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
        return img if img.size == (n, n) else img.resize((n, n), Image.LANCZOS, box=box)
    if opts.transform == "center-crop-wide":  # a 2:1 band of the image, centred in the square
        cw, ch = (min(w, 2 * h), min(h, w // 2)) if w >= 2 * h else (w, max(w // 2, 1))
        box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
        inner = img.resize((n, n // 2), Image.LANCZOS, box=box)
    else:  # pad: the whole image, its longer side n
        scale = n / max(w, h)
        inner = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    canvas = Image.new(img.mode, (n, n), opts.background[0] if img.mode == "L" else opts.background)
    canvas.paste(inner, ((n - inner.width) // 2, (n - inner.height) // 2))
    return canvas


# -- the whole folder -----------------------------------------------------------------------------

@dataclass
class Tally:
    """What a conversion did, for its summary and classes.json."""

    written: dict[str, int] = field(default_factory=dict)  # images per split
    per_class: dict[int, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    upscaled: int = 0


def converted(jobs: list[tuple[str, str, ImageOptions]], workers: int) -> Iterator[tuple[dict[str, bytes] | None, str, bool]]:
    """convert_file over the jobs, in their order, in `workers` processes (in this one for 1)."""
    if workers <= 1:
        yield from map(convert_file, jobs)
        return
    with multiprocessing.get_context().Pool(workers) as pool:  # leaving the block ends the workers
        yield from pool.imap(convert_file, jobs, chunksize=max(1, min(16, len(jobs) // (workers * 8))))


def samples(found: Found, order: Iterable[int], results: Iterable, tally: Tally,
            bar: tqdm) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, fields) of the readable images, in `order`; the others go to the tally."""
    width = max(7, len(str(len(found.files))))
    for i, (fields, why, upscaled) in zip(order, results):
        bar.update()
        rel, label = found.files[i]
        if fields is None:
            tally.skipped.append((rel, why))
            continue
        tally.upscaled += upscaled
        if label >= 0:
            fields = {**fields, "cls": str(label).encode()}
            tally.per_class[label] = tally.per_class.get(label, 0) + 1
        yield f"{i:0{width}d}", fields



def write_image_shards(source: Path, out: Path, opts: ImageOptions, *, labels: str = "auto", holdout: int = 0,
                       shard_size: int = 500, seed: int = 0, workers: int = 1, progress: bool = True) -> tuple[dict[str, int], Found, Tally]:
    """Convert every image under SOURCE (shuffled with `seed`; the first `holdout` readable ones go
    to val-*.tar, the rest to train-*.tar); returns shards per split, the scan and the tally."""
    opts.validate()
    if shard_size < 1 or workers < 1:
        raise ConfigError(f"--shard-size {shard_size} and --workers {workers} must be >= 1")
    found = scan(source, labels)
    if not found.files:
        raise ConfigError(f"{source} holds no image ({len(found.skipped)} other file(s), e.g. "
                          f"{found.skipped[0][0] if found.skipped else 'none'}); nothing to convert")
    if not 0 <= holdout < len(found.files):
        raise ConfigError(f"--holdout {holdout} must be in [0, {len(found.files)}) (the images found)")
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(found.files))]
    jobs = [(str(source), found.files[i][0], opts) for i in order]
    tally = Tally(skipped=list(found.skipped))

    def write_all(tmp: Path) -> dict[str, int]:
        results = converted(jobs, workers)
        with tqdm(total=len(jobs), unit="img", desc="converting", disable=not progress, mininterval=0.5) as bar:
            try:
                stream = samples(found, order, results, tally, bar)
                counts = {}
                for split, part in (("val", itertools.islice(stream, holdout)), ("train", stream)):
                    if split == "train" or holdout:
                        counts[split] = write_split(_counting(part, tally, split), tmp, split, shard_size, mtime=SHARD_MTIME)
            finally:
                results.close()  # ends the worker processes
        if not tally.written.get("train"):
            read, (path, why) = sum(tally.written.values()), sorted(tally.skipped)[0]
            raise ConfigError(f"{source} holds no readable image ({len(tally.skipped)} file(s) skipped, e.g. {path}: {why})"
                              if not read else f"{source}: all {read} readable image(s) went to --holdout {holdout}; "
                              f"none is left for training")
        _write_metadata(tmp, found, tally)
        return counts

    counts = publish(out, write_all)
    for name in METADATA - {"dataset.json"}:  # a rerun without classes or skips leaves none of the old ones
        if (out / name).exists() and not _metadata_written(name, found, tally):
            (out / name).unlink()
    return counts, found, tally


def _counting(part: Iterable[tuple[str, dict[str, bytes]]], tally: Tally, split: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    for item in part:
        tally.written[split] = tally.written.get(split, 0) + 1
        yield item


def _metadata_written(name: str, found: Found, tally: Tally) -> bool:
    return bool(found.classes) if name == "classes.json" else bool(tally.skipped)


def _write_metadata(folder: Path, found: Found, tally: Tally) -> None:
    """classes.json (class names by index, images per class) and skipped.txt (path, tab, why)."""
    if found.classes:
        counts = {name: tally.per_class.get(i, 0) for i, name in enumerate(found.classes)}
        (folder / "classes.json").write_text(json.dumps({"classes": found.classes, "counts": counts,
                                                         "layout": found.layout}, indent=1) + "\n")
    if tally.skipped:
        (folder / "skipped.txt").write_text("".join(f"{path}\t{why}\n" for path, why in sorted(tally.skipped)))


def summary(found: Found, tally: Tally, opts: ImageOptions, destination: str, shown: int = 20) -> str:
    """What the conversion did, for the terminal: images per split, classes, what was skipped and
    why, and the command that trains on the result."""
    lines = [f"converted {sum(tally.written.values())} image(s) to {opts.size}x{opts.size} {opts.format} "
             f"({', '.join(f'{n} {split}' for split, n in tally.written.items())}; labels: {found.layout})"]
    if found.classes:
        counts = [f"{name} {tally.per_class.get(i, 0)}" for i, name in enumerate(found.classes)]
        lines.append(f"{len(found.classes)} classes: {', '.join(counts[:shown])}" + (" ..." if len(counts) > shown else ""))
    if tally.upscaled:
        lines.append(f"{tally.upscaled} image(s) were smaller than {opts.size} px and were upscaled")
    if tally.skipped:
        lines.append(f"skipped {len(tally.skipped)} file(s) (all listed in skipped.txt beside the shards):")
        lines += [f"  {path}: {why}" for path, why in sorted(tally.skipped)[:shown]]
        if len(tally.skipped) > shown:
            lines.append(f"  ... and {len(tally.skipped) - shown} more")
    shards = destination.rstrip("/") + "/train-*.tar"
    keys = f"data.shards='{shards}' data.image_size={opts.size} data.channels={opts.channels}"
    lines.append(f"train: gannet train cgan_mnist {keys} model.num_classes={len(found.classes)}" if found.classes
                 else f"train: gannet train sngan_mnist {keys}")
    return "\n".join(lines)
