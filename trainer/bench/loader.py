"""Loader throughput (`gannet bench loader [CONFIG] [SHARDS ...]`): images/s the data stream alone
delivers; and at real resolution (`gannet bench loader --sizes 64 128 256`), against what plain
decoding allows.

The training stream itself (gannet.trainer.data.stream: shard reads, shuffle buffer, decode, batching in the
loader workers), with no model, timed on the config's `data.shards` and on each other shard
source given (an `s3://` prefix, an `http(s)://` pattern, another folder), so a remote store can
be compared with local disk on the same machine. Sources are timed in turns, a block of batches
each, so that all of them see the same machine load. `loader_throughput` times one config's whole
training stream (both domains of unpaired data) for `gannet bench speed`'s loader ratio.

`resolution_bench` writes JPEG shards itself (the bundled images, upscaled, with grain) at each size
and times, in turns within one run: the ceiling (Pillow decoding the same bytes in a tight loop,
nothing else), the stream with 1 and 2 workers, draft-mode decoding of a stored 512 px image to
256 against a full decode + resize, and `gannet shards images` with 1 and 2 workers.
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from gannet.trainer.config.schema import Config, DataConfig
from gannet.trainer.data import remote
from gannet.trainer.data.stream import DataStream, center_square, expand_urls, open_stream, stream_urls


def source_kind(pattern: str) -> str:
    return pattern.split("://", 1)[0] if remote.is_remote(pattern) else "local"


def loader_images_per_s(sources: list[str], cfg: DataConfig, *, batches: int = 60, warmup: int = 5,
                        rounds: int = 3, seed: int = 0) -> list[dict]:
    """Images/s of the stream over each shard source (a pattern as `data.shards` takes it)."""
    policy = remote.RetryPolicy(cfg.retries, cfg.retry_backoff_s)
    streams = [DataStream(expand_urls(pattern, policy), cfg, rank=0, world=1, seed=seed) for pattern in sources]
    for stream in streams:  # starts the workers and fills the shuffle buffers
        for _ in range(warmup):
            next(stream)
    elapsed = [0.0] * len(streams)
    per_round = max(1, batches // rounds)
    for _ in range(rounds):
        for i, stream in enumerate(streams):
            start = time.perf_counter()
            for _ in range(per_round):
                next(stream)
            elapsed[i] += time.perf_counter() - start
    return [{"source": pattern, "kind": source_kind(pattern), "batches": per_round * rounds,
             "images_per_s": per_round * rounds * cfg.batch_size / seconds, "retries": stream.position.retries,
             "skipped": stream.position.errors}
            for pattern, stream, seconds in zip(sources, streams, elapsed)]


def loader_bench(cfg: DataConfig, others: list[str], *, batches: int, out: Path) -> list[dict]:
    """Time `cfg.shards` and `others`, print a table, write the rows as JSON to `out`."""
    rows = loader_images_per_s([cfg.shards, *others], cfg, batches=batches)
    print(f"loader throughput (batch {cfg.batch_size}, {cfg.num_workers} worker(s), {cfg.image_size} px, "
          f"{rows[0]['batches']} batches per source, timed in turns):")
    for row in rows:
        print(f"  {row['kind']:6s} {row['images_per_s']:10.1f} images/s   {row['source']}"
              + (f"   ({row['retries']} retries)" if row["retries"] else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"loader": rows}, indent=2))
    return rows


def loader_throughput(cfg: Config, seconds: float) -> dict[str, Any]:
    """Images/s of the loader alone (shards -> decoded, augmented, collated batches, in the config's
    worker processes), after its first batch (worker start-up excluded), over `seconds`."""
    stream = open_stream(stream_urls(cfg.data), cfg.data, rank=0, world=1, seed=cfg.seed)
    next(stream)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += next(stream)["image"].shape[0]
    rate = images / (time.perf_counter() - start)
    del stream  # ends the worker processes before the step is timed
    workers = max(cfg.data.num_workers, 1) * len(stream_urls(cfg.data))
    return {"images_per_s": rate, "workers": workers, "images_per_s_per_worker": rate / workers}


# -- the loader at real resolution (`gannet bench loader --sizes 64 128 256`) ----------------------

def bench_pictures(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """`n` RGB pictures of `size` px from the bundled real images: a silhouette and a digit in two
    colours each, upscaled, with grain as a camera leaves it, so that JPEG sees photo-like detail
    (an upscaled 28 px image alone compresses, and decodes, far faster than a photo)."""
    from gannet.trainer.data.shards import bundled_mnist, bundled_silhouettes

    digits, _ = bundled_mnist()
    shapes, _ = bundled_silhouettes()
    rng = np.random.default_rng(seed)
    pictures = []
    for _ in range(n):
        shape, digit = shapes[rng.integers(len(shapes))] / 255.0, digits[rng.integers(len(digits))] / 255.0
        colours = rng.integers(0, 256, size=(3, 3)).astype(np.float32)
        small = (colours[0] * (1 - shape[..., None]) + colours[1] * shape[..., None]) * (1 - digit[..., None]) \
            + colours[2] * digit[..., None]
        big = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((size, size), Image.BICUBIC), dtype=np.float32)
        pictures.append(np.clip(big + rng.normal(0, 8, big.shape), 0, 255).astype(np.uint8))
    return pictures


def jpeg_shards(folder: Path, pictures: list[np.ndarray], per_shard: int, quality: int = 95) -> list[bytes]:
    """The pictures as JPEG shards in FOLDER (train-*.tar); returns the JPEG bytes, in order."""
    from gannet.trainer.data.folder import SHARD_MTIME
    from gannet.trainer.data.shards import write_split

    encoded = []
    for picture in pictures:
        buf = io.BytesIO()
        Image.fromarray(picture).save(buf, format="JPEG", quality=quality)
        encoded.append(buf.getvalue())
    samples = ((f"{i:07d}", {"jpg": data, "cls": b"0"}) for i, data in enumerate(encoded))
    write_split(samples, folder, "train", per_shard, mtime=SHARD_MTIME)  # as `gannet shards images` writes them
    return encoded


def plain_decode(data: bytes, size: int) -> np.ndarray:
    """The ceiling's unit of work: Pillow decodes the JPEG, resizes it if it is not at `size`, and hands
    over the pixels, with none of the loader's reading, shuffling, batching or conversion around it."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.BICUBIC)
        return np.asarray(img)


def draft_decode(data: bytes, size: int) -> np.ndarray:
    """The loader's decode of one JPEG (center_square: draft mode when stored >= 2x the target)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(center_square(img, size, "RGB"))


def decode_rate(decode: Callable[[bytes, int], np.ndarray], blobs: list[bytes], size: int, seconds: float) -> float:
    """Images/s of `decode` over the blobs in a tight loop, for about `seconds`."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for data in blobs:
            decode(data, size)
        done += len(blobs)
    return done / (time.perf_counter() - start)


def stream_rate(stream: DataStream, seconds: float, drain: int) -> float:
    """Images/s a running stream delivers: the `drain` batches already prefetched are taken first,
    so the clock starts with every worker busy."""
    for _ in range(drain):
        next(stream)
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        images += next(stream)["image"].shape[0]
    return images / (time.perf_counter() - start)


def size_row(data: DataConfig, folder: Path, size: int, *, workers: tuple[int, ...], seconds: float, rounds: int,
             images: int = 512) -> dict[str, Any]:
    """At one size: the plain-decode ceiling and the stream with each worker count, timed in turns
    over the same JPEG bytes (and simplejpeg's decode beside Pillow's, when it is installed)."""
    blobs = jpeg_shards(folder / f"{size}px", bench_pictures(images, size, seed=size), per_shard=images // 8)
    decoders = {"ceiling": plain_decode, **({"simplejpeg": simplejpeg_decode} if simplejpeg_decode else {})}
    streams = {}
    for w in workers:
        cfg = replace(data, shards=str(folder / f"{size}px" / "train-*.tar"), image_size=size, channels=3, num_workers=w,
                      load_size=0, mirror=False, text_encoder="", shards_b="")
        streams[w] = DataStream(expand_urls(cfg.shards), cfg, rank=0, world=1, seed=0)
        next(streams[w])  # starts the workers
    rates: dict[str, float] = {}
    for _ in range(rounds):
        for name, decode in decoders.items():
            time.sleep(SETTLE_S)  # the streams' workers refill their prefetch queues, then stay idle
            rates[name] = rates.get(name, 0.0) + decode_rate(decode, blobs, size, seconds) / rounds
        for w, stream in streams.items():
            time.sleep(SETTLE_S)
            rates[f"workers_{w}"] = rates.get(f"workers_{w}", 0.0) + stream_rate(stream, seconds, drain=data.prefetch_factor * w) / rounds
    del streams  # ends the workers
    row = {"size": size, "batch_size": data.batch_size, "jpeg_kb": sum(map(len, blobs)) / len(blobs) / 1024, **rates}
    row["loader_vs_ceiling"] = rates[f"workers_{workers[0]}"] / rates["ceiling"]
    if len(workers) > 1:
        row["scaling"] = rates[f"workers_{workers[-1]}"] / rates[f"workers_{workers[0]}"]
    return row


SETTLE_S = 0.75


def _simplejpeg() -> Callable[[bytes, int], np.ndarray] | None:
    """simplejpeg's decode (libjpeg-turbo straight to a NumPy array), if installed: measured beside
    Pillow's so the choice between them rests on numbers from the same run."""
    try:
        import simplejpeg
    except ImportError:
        return None

    def decode(data: bytes, size: int) -> np.ndarray:
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size)
        if pixels.shape[:2] != (size, size):
            pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC))
        return pixels

    return decode


simplejpeg_decode = _simplejpeg()


def draft_row(folder: Path, *, seconds: float, rounds: int, images: int = 96) -> dict[str, Any]:
    """Stored 512 px -> 256 px: a full decode + resize against the loader's draft-mode decode."""
    blobs = jpeg_shards(folder / "512px", bench_pictures(images, 512, seed=512), per_shard=images)
    full = draft = 0.0
    for _ in range(rounds):
        full += decode_rate(plain_decode, blobs, 256, seconds) / rounds
        draft += decode_rate(draft_decode, blobs, 256, seconds) / rounds
    return {"stored": 512, "size": 256, "full_decode_resize": full, "draft": draft, "speedup": draft / full}


def conversion_row(folder: Path, *, workers: tuple[int, ...], rounds: int, photos: int = 96) -> dict[str, Any]:
    """`gannet shards images` of a folder of 1024x768 JPEG photos to 256 px, with each worker count
    (in turns); and whether every worker count wrote the same bytes."""
    from gannet.trainer.data.folder import ImageOptions, write_image_shards

    source = folder / "photos"
    for i, picture in enumerate(bench_pictures(photos, 1024, seed=1024)):
        (source / f"class_{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture[128:-128]).save(source / f"class_{i % 3}" / f"{i:04d}.jpg", quality=92)
    seconds = {w: 0.0 for w in workers}
    for _ in range(rounds):
        for w in workers:
            start = time.perf_counter()
            write_image_shards(source, folder / f"out-{w}", ImageOptions(size=256), shard_size=32, workers=w, progress=False)
            seconds[w] += time.perf_counter() - start
    outputs = [{p.name: p.read_bytes() for p in sorted((folder / f"out-{w}").iterdir())} for w in workers]
    row = {"photos": photos, "source": "1024x768 JPEG", "size": 256, **{f"seconds_{w}": s / rounds for w, s in seconds.items()},
           "identical_bytes": all(o == outputs[0] for o in outputs)}
    row["speedup"] = seconds[workers[0]] / seconds[workers[-1]]
    return row


def machine() -> dict[str, Any]:
    """What the figures were taken on: CPUs, load, and the decoder's versions."""
    import os
    import platform

    from PIL import __version__ as pillow
    from PIL import features

    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "loadavg": os.getloadavg(),
            "pillow": pillow, "libjpeg_turbo": features.version("libjpeg_turbo"),
            "simplejpeg": getattr(sys.modules.get("simplejpeg"), "__version__", None)}


def resolution_bench(data: DataConfig, sizes: list[int], *, out: Path, workers: tuple[int, ...] = (1, 2),
                     seconds: float = 2.0, rounds: int = 3) -> dict[str, Any]:
    """The loader at each size against the plain-decode ceiling, draft mode, and conversion speed;
    prints a table and writes the JSON to `out`."""
    import tempfile

    before = machine()
    with tempfile.TemporaryDirectory(prefix="gannet-loader-bench-") as tmp:
        rows = [size_row(data, Path(tmp), size, workers=workers, seconds=seconds, rounds=rounds) for size in sizes]
        draft = draft_row(Path(tmp), seconds=seconds, rounds=rounds)
        conversion = conversion_row(Path(tmp), workers=workers, rounds=2)
    report = {"machine": before, "loadavg_after": machine()["loadavg"], "sizes": rows, "draft": draft, "conversion": conversion}
    print(resolution_table(report, workers))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"loader_resolution": report}, indent=2))
    return report


def resolution_table(report: dict[str, Any], workers: tuple[int, ...]) -> str:
    m, (one, many) = report["machine"], (workers[0], workers[-1])
    lines = [f"loader on JPEG (q95) shards of the bundled images, batch {report['sizes'][0]['batch_size']}, "
             f"{m['cpus']} CPUs, load {' '.join(f'{x:.2f}' for x in m['loadavg'])} -> "
             f"{' '.join(f'{x:.2f}' for x in report['loadavg_after'])}, Pillow {m['pillow']} (libjpeg-turbo {m['libjpeg_turbo']})",
             f"  {'size':>5} {'ceiling':>9} {f'{one} worker':>9} {'x ceil':>7} {f'{many} workers':>10} {f'x {one}w':>6}"
             + ("  simplejpeg" if m["simplejpeg"] else "") + "   (images/s)"]
    for r in report["sizes"]:
        lines.append(f"  {r['size']:>5} {r['ceiling']:9.0f} {r[f'workers_{one}']:9.0f} {r['loader_vs_ceiling']:7.2f} "
                     f"{r[f'workers_{many}']:10.0f} {r.get('scaling', 1.0):6.2f}" + (f"  {r['simplejpeg']:10.0f}" if "simplejpeg" in r else ""))
    d, c = report["draft"], report["conversion"]
    lines.append(f"draft mode, stored 512 px -> 256: {d['draft']:.0f} images/s against {d['full_decode_resize']:.0f} "
                 f"for a full decode + resize ({d['speedup']:.2f}x)")
    lines.append(f"conversion of {c['photos']} {c['source']} photos to {c['size']} px: {c[f'seconds_{one}']:.2f} s with {one} "
                 f"worker, {c[f'seconds_{many}']:.2f} s with {many} ({c['speedup']:.2f}x); identical bytes: {c['identical_bytes']}")
    return "\n".join(lines)
