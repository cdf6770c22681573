"""The WebDataset stream: shards -> raw samples -> shuffle -> decode -> batches, resumable.

Design (docs/architecture.md, "Data"):
- Every epoch the shard list is permuted with the same seed on every rank, then split by rank and
  by loader worker, so one pass visits each shard once across the whole job (disjoint reads).
- Each worker runs its own endless sequence of epochs; the stream has no end, the loop counts
  steps. Because no worker ever runs dry, the DataLoader hands out batches in strict
  round-robin order over workers, which makes the position of the stream exact to save:
  per worker (epoch, raw samples consumed in that epoch), plus which worker is next.
- Shuffling happens on raw (undecoded) samples from a seeded buffer, and decoding comes after,
  so resuming replays only tar reads to the saved position, never image decodes or transforms.
- Captions (the `txt` field, one per line) become `text_emb` when `data.text_encoder` is set: one
  caption per sample and epoch, drawn from a seed of the sample's position (so a resumed stream
  draws the same ones), encoded in the worker by a frozen sentence encoder (gannet.models.text).
- A sample or shard that fails to read or decode is skipped and counted. Counts travel with the
  batches to the training process, which enforces `data.max_errors` for the whole run.
- Remote shards (`s3://`, `http(s)://`, gannet.trainer.data.remote) read like local ones. A transient network
  failure is retried (counted as `retries`, beside `errors`); a shard that still fails is skipped
  and counted like a corrupt one, within the same budget.
"""

from __future__ import annotations

import glob
import io
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import braceexpand
import numpy as np
import simplejpeg
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from gannet.models.text import SentenceEncoder
from gannet.trainer.config.schema import Config, DataConfig
from gannet.trainer.data import remote
from gannet.trainer.engine import preemption
from gannet.trainer.errors import ConfigError, DataError

log = logging.getLogger("gannet.data")
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def expand_urls(pattern: str, policy: remote.RetryPolicy | None = None) -> list[str]:
    """Shard URLs from a brace pattern, a glob, a comma list, `s3://` / `http(s)://` URLs (an
    `s3://bucket/prefix/` lists the prefix's .tar objects), or `pipe:` commands.

    Shards must be there now: a typo in a shard path, wrong credentials or a missing bucket are a
    config error at start-up, not an endless stream of skipped shards later. (Of a remote brace
    pattern, the first shard is read to check; the others are not fetched here.)
    """
    urls: list[str] = []
    for part in pattern.split(","):
        expanded = list(braceexpand.braceexpand(part.strip()))
        for i, url in enumerate(expanded):
            if remote.is_remote(url):
                urls.extend(remote.expand(url, policy) if i == 0 or url.endswith("/") or glob.has_magic(url) else [url])
                continue
            if "://" in url or url.startswith("pipe:"):
                urls.append(url)
                continue
            matches = sorted(glob.glob(url)) if glob.has_magic(url) else ([url] if os.path.exists(url) else [])
            if not matches:
                raise ConfigError(
                    f"data.shards: no file matches '{url}' (write shards with "
                    f"`gannet shards mnist|unpaired|silhouettes --out DIR`, "
                    f"or point data.shards at existing .tar files)"
                )
            urls.extend(matches)
    if not urls:
        raise ConfigError(f"data.shards={pattern!r} names no shards")
    return urls


def decode_image_sample(sample: dict[str, Any], image_size: int, channels: int) -> dict[str, torch.Tensor]:
    """One raw WebDataset sample -> {"image": CxHxW float in [-1, 1], "label": int (-1 if none)}."""
    item = decode_pixels(sample, image_size, channels)
    return {"image": to_unit_range(item["image"]), "label": item["label"]}


def decode_pixels(sample: dict[str, Any], image_size: int, channels: int) -> dict[str, torch.Tensor]:
    """One raw sample -> {"image": CxHxW uint8 at image_size, "label"}: the stream's per-sample work."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError(f"sample {sample.get('__key__')!r} has no image field (looked for {', '.join(IMAGE_KEYS)})")
    pixels = jpeg_square(sample[key], image_size, channels) if key in ("jpg", "jpeg") else None
    if pixels is None:
        with Image.open(io.BytesIO(sample[key])) as img:
            pixels = np.array(center_square(img, image_size, "L" if channels == 1 else "RGB"))  # writable, for torch
    image = torch.from_numpy(pixels)[None] if channels == 1 else torch.from_numpy(pixels).permute(2, 0, 1)
    label = int(sample["cls"]) if "cls" in sample else -1
    return {"image": image, "label": torch.tensor(label)}


def jpeg_square(data: bytes, size: int, channels: int) -> np.ndarray | None:
    """A JPEG's centred square through simplejpeg: libjpeg-turbo straight into a NumPy array, the same
    pixels as Pillow's decode at about 1.5x its speed (`gannet bench loader --sizes`), DCT-scaled
    like draft mode (`min_height`/`min_width`). None for what Pillow handles better (CMYK, whose
    Adobe inversion simplejpeg does not apply); a damaged file raises, as with Pillow."""
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    if colorspace == "CMYK":
        return None
    target = size if min(height, width) >= 2 * size else 0
    pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB", min_height=target, min_width=target)
    pixels = pixels[..., 0] if channels == 1 else pixels
    if pixels.shape[:2] == (size, size):
        return pixels
    return np.array(center_square(Image.fromarray(pixels), size, "L" if channels == 1 else "RGB"))


def center_square(img: Image.Image, size: int, mode: str) -> Image.Image:
    """The image's centred square at `size` x `size`: a non-square image is cropped, not squashed.

    A JPEG stored at least twice the target size is decoded in draft mode: libjpeg scales its DCT
    by 1/2, 1/4 or 1/8 while decoding (`Image.draft`), to the smallest scale that still covers the
    target, which skips most of the decoding and resizing work of a large photo."""
    if min(img.size) >= 2 * size:
        img.draft(mode, (size, size))
    img = img.convert(mode) if img.mode != mode else img
    width, height = img.size
    if width == height == size:
        return img
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return img.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))


def stack(tensors: list[torch.Tensor], shared: bool) -> torch.Tensor:
    """torch.stack; in a loader worker into shared memory, as torch's default collate does, so that
    handing the batch to the training process copies nothing."""
    if not shared:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first._typed_storage()._new_shared(first.numel() * len(tensors), device="cpu")
    return torch.stack(tensors, out=first.new(storage).resize_(len(tensors), *first.shape))


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (x / 127.5 - 1), for one image or a whole batch. Batches
    leave the stream as uint8 (a quarter of the bytes to move between processes and to the GPU);
    the engine applies this on the device (`Engine.inputs`)."""
    return pixels.to(torch.float32).div_(127.5).sub_(1.0)


def sample_captions(sample: dict[str, Any]) -> list[str]:
    """The captions of one raw sample: its `txt` field, one caption per non-empty line."""
    if "txt" not in sample:
        raise ValueError(f"sample {sample.get('__key__')!r} has no caption (txt field), and data.text_encoder is set")
    captions = [line.strip() for line in sample["txt"].decode("utf-8").splitlines() if line.strip()]
    if not captions:
        raise ValueError(f"sample {sample.get('__key__')!r} has an empty caption")
    return captions


def shard_samples(urls: Iterable[str], handler: Callable[[Exception], bool], policy: remote.RetryPolicy | None = None,
                  stats: remote.ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples ({"__key__", ext: bytes}) of the shards in order, local or remote.

    WebDataset's own tar reader and key grouping, behind gannet's opener: local files and `pipe:`
    commands as WebDataset opens them, `s3://` and `http(s)://` through gannet.trainer.data.remote (retried,
    resumed mid-shard, counted in `stats`). An error ends its shard (reported once to `handler`,
    which returns whether to go on with the next one).

    One check tarfile lacks: reading a stream, it takes a damaged header (a flipped byte breaks its
    checksum) or a cut inside a header for the end of the archive, and every sample after it would
    vanish uncounted. So what tarfile left unread of a `.tar` shard is checked (`_ended_early`) and
    reported as one error. (Damage in the last 10 kB, tarfile's read-ahead, can still go unseen;
    compressed shards are not checked.)
    """
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    def files() -> Iterator[dict[str, Any]]:
        for url in urls:
            try:
                local_tar = url.endswith(".tar") and os.path.isfile(url)
                stream = remote.open_shard(url, policy, stats) if remote.is_remote(url) else open(url, "rb") if local_tar else wds.gopen(url)
                try:
                    for item in (tar_members(stream, url) if local_tar else tar_file_iterator(stream)):
                        item["__url__"] = url
                        yield item
                    problem = _ended_early(url, stream) if url.endswith(".tar") else ""
                finally:
                    stream.close()
                if problem:
                    raise DataError(problem)
            except Exception as exn:  # noqa: BLE001 (the handler decides)
                exn.args = (*exn.args, f"@ {url}")
                if not handler(exn):
                    return
            yield {}  # end of shard: a sample never spans two shards

    return group_by_keys(files(), handler=handler)


def first_captions(urls: list[str], n: int) -> list[tuple[str, int]]:
    """(first caption, class or -1) of the first `n` captioned samples, in shard order: the fixed
    prompts behind a text-to-image run's sample grids (the same for every run on these shards)."""
    found: list[tuple[str, int]] = []
    for sample in shard_samples(urls, handler=wds.warn_and_continue):
        if "txt" in sample:
            found.append((sample_captions(sample)[0], int(sample["cls"]) if "cls" in sample else -1))
            if len(found) == n:
                break
    if not found:
        raise DataError(f"no captioned samples (txt field) in {urls[0]} ...: text-to-image needs caption shards "
                        f"(gannet shards mnist|captions|cub|coco)")
    return found


TAR_BLOCK = 512
META = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata members (`__key__`, `__meta__/...`), skipped as it does


def tar_members(stream: Any, url: str) -> Iterator[dict[str, Any]]:
    """The regular files of an uncompressed tar stream, as {"fname", "data"} like WebDataset's
    `tar_file_iterator`, read straight from the 512-byte headers. Why not tarfile: it builds a full
    TarInfo per member in Python (~70-100 us each here), a quarter of a loader worker's time at 256 px
    where a sample is two members; the loader needs only a name, a size and a type. Read: ustar and
    GNU long names and PAX `path` records (what Python's and WebDataset's writers emit). A header
    whose checksum fails, or data cut short, raises DataError, which ends the shard as one counted
    error, as tarfile's stream did (with `_ended_early` telling what it left unread)."""
    long_name = ""
    while True:
        header = stream.read(TAR_BLOCK)
        if len(header) < TAR_BLOCK or not header.strip(b"\0"):
            if header.strip(b"\0"):
                raise DataError(f"{url}: the shard is truncated inside a tar header; the samples after the cut were skipped")
            return  # the end-of-archive block (what follows is checked by _ended_early), or the end of the file
        if not checksum_ok(header):
            raise DataError(f"{url}: a damaged tar header (its checksum fails); the samples after it were skipped")
        size, kind = int(header[124:136].strip(b"\0 ") or b"0", 8), header[156:157]
        data = stream.read(size)
        if len(data) < size or len(stream.read(-size % TAR_BLOCK)) < -size % TAR_BLOCK:
            raise DataError(f"{url}: the shard is truncated inside a member; the samples after the cut were skipped")
        if kind == b"L":  # GNU long name: the next member's
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        if kind == b"x":  # PAX extended header: a `path` record names the next member
            long_name = next((v for k, v in pax_records(data) if k == "path"), long_name)
            continue
        name, long_name = long_name or ustar_name(header), ""
        if kind not in (b"0", b"\0", b"7") or META.match(name):
            continue  # directories, links, global PAX headers, WebDataset metadata
        yield {"fname": name, "data": data}


def checksum_ok(header: bytes) -> bool:
    """The header's stored checksum against its bytes (the checksum field counted as spaces),
    unsigned as POSIX says or signed as some old writers did; tarfile accepts both too."""
    stored = header[148:156].strip(b"\0 ")
    if not stored or not stored.isdigit():
        return False
    unsigned = sum(header[:148]) + 256 + sum(header[156:])
    if int(stored, 8) == unsigned:
        return True
    return int(stored, 8) == unsigned - 2 * sum(b for b in header if b > 127)  # signed: bytes >= 128 count negative


def ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar" and (prefix := header[345:500].split(b"\0", 1)[0]):
        name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def pax_records(data: bytes) -> Iterator[tuple[str, str]]:
    """PAX records: "LENGTH KEY=VALUE\\n", LENGTH counting the whole record."""
    at = 0
    while at < len(data) and data[at:at + 1] != b"\0":
        space = data.index(b" ", at)
        length = int(data[at:space])
        key, _, value = data[space + 1 : at + length - 1].partition(b"=")
        yield key.decode("utf-8"), value.decode("utf-8", "surrogateescape")
        at += length


def _ended_early(url: str, stream: Any) -> str:
    """Why a tar shard's stream ended before its end (see `shard_samples`), or "". Reads the rest."""
    try:
        unread, data_left = 0, False
        while chunk := stream.read(1 << 20):
            unread += len(chunk)
            data_left = data_left or bool(chunk.strip(b"\0"))
        if data_left:
            return f"{url}: a damaged tar header cut the shard short ({unread} bytes unread); the samples after it were skipped"
        if os.path.isfile(url):
            size = os.path.getsize(url)
            with open(url, "rb") as f:
                f.seek(max(size - 1024, 0))
                if size % 512 or size < 1024 or f.read().strip(b"\0"):
                    return f"{url}: the shard is truncated ({size} bytes, no end-of-archive blocks); the samples after the cut were skipped"
    except (OSError, ValueError):  # a pipe that is gone, a closed stream: nothing more to learn
        pass
    return ""


@dataclass
class StreamPosition:
    """Where each loader worker of one rank stands: enough to restart the stream exactly."""

    epochs: list[int]
    consumed: list[int]  # raw samples taken from the shuffle buffer in the current epoch
    next_worker: int = 0
    errors: int = 0  # samples/shards skipped so far, over the whole run (this rank)
    retries: int = 0  # transient read failures retried (remote shards), over the whole run (this rank)

    @classmethod
    def start(cls, workers: int) -> "StreamPosition":
        return cls(epochs=[0] * workers, consumed=[0] * workers)

    def state_dict(self) -> dict:
        return {"epochs": list(self.epochs), "consumed": list(self.consumed), "next_worker": self.next_worker,
                "errors": self.errors, "retries": self.retries}

    @classmethod
    def from_state(cls, state: dict) -> "StreamPosition":
        return cls(**state)  # a checkpoint from before `retries` existed starts that count at 0


@dataclass
class _WorkerCounters:
    errors: int = 0
    skipping: bool = False
    last_error: str = field(default="")


class ShardStream(IterableDataset):
    """An endless, per-rank stream of decoded, collated batches (see the module docstring)."""

    def __init__(self, urls: list[str], cfg: DataConfig, *, rank: int, world: int, seed: int, position: StreamPosition):
        super().__init__()
        self.urls, self.cfg = urls, cfg
        self.rank, self.world, self.seed = rank, world, seed
        self.position = position
        self.workers = max(cfg.num_workers, 1)

    def shards_for(self, epoch: int, worker: int) -> list[str]:
        order = list(self.urls)
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)  # same on every rank
        return order[self.rank :: self.world][worker :: self.workers]

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, int]]]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.position.next_worker) % self.workers
        epoch, skip = self.position.epochs[worker], self.position.consumed[worker]
        counters = _WorkerCounters()
        reads = remote.ReadStats()  # retries happen in this worker; the count travels with each batch
        policy = remote.RetryPolicy(self.cfg.retries, self.cfg.retry_backoff_s)
        encoder = SentenceEncoder(self.cfg.text_encoder) if self.cfg.text_encoder else None

        def on_error(exn: Exception) -> bool:
            if not counters.skipping:  # errors before the resume point were counted by the earlier run
                counters.errors += 1
                counters.last_error = f"{type(exn).__name__}: {exn}"
                log.warning("skipped unreadable shard data (rank %d, worker %d): %s", self.rank, worker, counters.last_error)
            return True

        while True:
            shards = self.shards_for(epoch, worker)
            raw = shard_samples(shards, on_error, policy, reads)
            buffer = self.cfg.shuffle_buffer
            shuffled = wds.shuffle(buffer, initial=buffer, seed=f"{self.seed}/{epoch}/{self.rank}/{worker}")(raw)
            consumed, batch, captions, decoded, yielded = 0, [], [], 0, False
            clock = time.perf_counter()
            counters.skipping = skip > 0
            for sample in shuffled:
                consumed += 1
                if consumed <= skip:
                    counters.skipping = consumed < skip
                    continue
                try:
                    item = decode_pixels(sample, self.cfg.load_size or self.cfg.image_size, self.cfg.channels)
                    if encoder is not None:
                        draw = random.Random(f"{self.seed}/{epoch}/{self.rank}/{worker}/{consumed}")
                        captions.append(draw.choice(sample_captions(sample)))
                    batch.append(augment(item, self.cfg, (self.seed, epoch, self.rank, worker, consumed)))
                    decoded += 1
                except Exception as exn:  # a corrupt sample costs one sample, not the run
                    on_error(exn)
                    continue
                if len(batch) == self.cfg.batch_size:
                    collated = {k: stack([s[k] for s in batch], shared=info is not None) for k in batch[0]}
                    if encoder is not None:
                        collated["text_emb"], captions = encoder(captions), []
                    busy = time.perf_counter() - clock  # this batch's work, not the time spent waiting to hand it over
                    yield collated, {"worker": worker, "epoch": epoch, "consumed": consumed, "errors": counters.errors,
                                     "retries": reads.retries, "busy_s": busy}
                    batch, yielded, clock = [], True, time.perf_counter()
            if not yielded and skip == 0:  # a whole pass without one batch would loop forever: say so instead
                raise DataError(
                    f"rank {self.rank} worker {worker} read {decoded} usable sample(s) in a whole pass over its shards "
                    f"{shards}, fewer than data.batch_size={self.cfg.batch_size} (last error: "
                    f"{counters.last_error or 'none'}); use more shards per worker, fewer workers or a smaller batch"
                )
            epoch, skip = epoch + 1, 0  # the incomplete last batch of an epoch is dropped


class DataStream:
    """The training process's end of the stream: batches in order, and the position to save."""

    def __init__(self, urls: list[str], cfg: DataConfig, *, rank: int, world: int, seed: int,
                 position: StreamPosition | None = None):
        self.urls = urls
        workers = max(cfg.num_workers, 1)
        if len(self.urls) < world * workers:
            raise DataError(
                f"data.shards: {len(self.urls)} shard(s) cannot feed {world} rank(s) x {workers} loader worker(s) "
                f"without overlap; write more, smaller shards (gannet shards ... --shard-size) or lower data.num_workers"
            )
        self.cfg = cfg
        self.position = position or StreamPosition.start(workers)
        if len(self.position.epochs) != workers:
            raise DataError(
                f"the checkpoint's data position has {len(self.position.epochs)} loader worker(s) but data.num_workers "
                f"gives {workers}; resume with data.num_workers={len(self.position.epochs)}"
            )
        self.errors_at_start, self.retries_at_start = self.position.errors, self.position.retries
        self._worker_errors, self._worker_retries = [0] * workers, [0] * workers
        dataset = ShardStream(self.urls, cfg, rank=rank, world=world, seed=seed, position=self.position)
        self._loader = wds.WebLoader(
            dataset, batch_size=None, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
            # batches ready ahead of the step; pinned host memory makes the engine's non_blocking copies async
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None, pin_memory=torch.cuda.is_available(),
            # Its own generator: by default a DataLoader draws its workers' base seed from the global
            # torch RNG when iteration starts, which would shift the noise stream after a resume.
            generator=torch.Generator().manual_seed(seed),
            worker_init_fn=preemption.loader_worker_init,  # outlive a preemption's SIGTERM in Slurm jobs
        )
        self._iter: Iterator | None = None
        self.meter = LoaderMeter(workers)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._iter = iter(self._loader)
        start = time.perf_counter()
        batch, meta = next(self._iter)
        worker = meta["worker"]
        self.meter.add(worker, time.perf_counter() - start, self.cfg.batch_size, meta["busy_s"])
        self.position.epochs[worker] = meta["epoch"]
        self.position.consumed[worker] = meta["consumed"]
        self.position.next_worker = (worker + 1) % len(self.position.epochs)
        self._worker_errors[worker] = meta["errors"]
        self.position.errors = self.errors_at_start + sum(self._worker_errors)
        self._worker_retries[worker] = meta["retries"]
        self.position.retries = self.retries_at_start + sum(self._worker_retries)
        if self.position.errors > self.cfg.max_errors:
            raise DataError(
                f"{self.position.errors} corrupt samples/shards skipped, over the budget data.max_errors="
                f"{self.cfg.max_errors}; check the shards (the log names each one) or raise the budget"
            )
        return batch


class LoaderMeter:
    """How the loader keeps up, between two reads (`take`): the time the training process waited
    for batches, and the images/s the workers produce (each worker's images over its busy time,
    summed over workers: what the loader could deliver, whether or not the step asks for it)."""

    def __init__(self, workers: int):
        self.workers = workers
        self.reset()

    def reset(self) -> None:
        self.waited, self.images, self.busy = 0.0, [0] * self.workers, [0.0] * self.workers

    def add(self, worker: int, waited: float, images: int, busy: float) -> None:
        self.waited += waited
        self.images[worker] += images
        self.busy[worker] += busy

    def take(self, steps: int) -> dict[str, float]:
        """{"data/wait_ms": mean wait per step, "data/loader_images_per_s": production rate}; resets."""
        rate = sum(n / t for n, t in zip(self.images, self.busy) if t > 0)
        stats = {"data/wait_ms": 1000 * self.waited / max(steps, 1), "data/loader_images_per_s": rate}
        self.reset()
        return stats


def augment(sample: dict[str, torch.Tensor], cfg: DataConfig, key: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Random crop from `data.load_size` to `data.image_size` (CycleGAN's) and random x-flip
    (`data.mirror`: StyleGAN2-ADA's and R3GAN's --mirror, CycleGAN's flip), drawn from a generator
    seeded by the sample's place in the stream (seed, epoch, rank, worker, index), not a global RNG:
    a resumed run crops and flips the same samples the same way, whichever worker decodes them."""
    if not cfg.load_size and not cfg.mirror:
        return sample
    rng = np.random.default_rng([k % 2**32 for k in key])
    image = sample["image"]
    if cfg.load_size:
        top, left = rng.integers(0, cfg.load_size - cfg.image_size + 1, size=2)
        image = image[:, top : top + cfg.image_size, left : left + cfg.image_size]
    if cfg.mirror and rng.random() < 0.5:
        image = image.flip(-1)
    return {**sample, "image": image.contiguous()}


@dataclass
class UnpairedPosition:
    """Positions of the two streams of unpaired data (domain A and domain B)."""

    a: StreamPosition
    b: StreamPosition

    @property
    def errors(self) -> int:
        return self.a.errors + self.b.errors

    @property
    def retries(self) -> int:
        return self.a.retries + self.b.retries

    def state_dict(self) -> dict:
        return {"a": self.a.state_dict(), "b": self.b.state_dict()}


class UnpairedStream:
    """Domain A (`data.shards`) and domain B (`data.shards_b`) as two independent streams, each
    with its own shard permutation, shuffle buffer and augmentation seeds, so which B image meets
    which A image is random and changes every epoch. Batches: {"image": A, "label": A's, "image_b": B}."""

    def __init__(self, a: DataStream, b: DataStream):
        self.a, self.b = a, b
        self.position = UnpairedPosition(a.position, b.position)

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self.a)
        return {**batch, "image_b": next(self.b)["image"]}

    @property
    def meter(self) -> "UnpairedMeter":
        return UnpairedMeter(self.a.meter, self.b.meter)


@dataclass
class UnpairedMeter:
    """Both streams' meters as one: a step waits for both; the slower one sets what the pair delivers."""

    a: LoaderMeter
    b: LoaderMeter

    def take(self, steps: int) -> dict[str, float]:
        a, b = self.a.take(steps), self.b.take(steps)
        return {"data/wait_ms": a["data/wait_ms"] + b["data/wait_ms"],
                "data/loader_images_per_s": min(a["data/loader_images_per_s"], b["data/loader_images_per_s"])}


B_SEED_OFFSET = 7_777_777  # stream B's seed: apart from A's, so the two are shuffled independently


def stream_urls(cfg: DataConfig) -> list[list[str]]:
    """Shard URLs of each stream: [A], or [A, B] when `data.shards_b` is set. Called before any
    process group exists, so a wrong path fails at once."""
    policy = remote.RetryPolicy(cfg.retries, cfg.retry_backoff_s)
    return [expand_urls(pattern, policy) for pattern in (cfg.shards, cfg.shards_b) if pattern]


def open_stream(urls: list[list[str]], cfg: DataConfig, *, rank: int, world: int, seed: int,
                state: dict | None = None) -> DataStream | UnpairedStream:
    """The training stream (one, or two for unpaired data), at a saved position if given."""
    if len(urls) == 1:
        return DataStream(urls[0], cfg, rank=rank, world=world, seed=seed,
                          position=StreamPosition.from_state(state) if state else None)
    a, b = (DataStream(u, cfg, rank=rank, world=world, seed=seed + offset,
                       position=StreamPosition.from_state(state[part]) if state else None)
            for u, offset, part in ((urls[0], 0, "a"), (urls[1], B_SEED_OFFSET, "b")))
    return UnpairedStream(a, b)


def first_images(urls: list[str], cfg: DataConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `n` decoded images (at `data.image_size`, no augmentation) and their labels, in shard
    order: a finite pass, for sample-grid inputs and evaluation's real sets. An unreadable sample
    is skipped with a warning, as in training."""
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for sample in shard_samples(urls, handler=wds.warn_and_continue):
        try:
            item = decode_image_sample(sample, cfg.image_size, cfg.channels)
        except Exception as exn:
            log.warning("skipped an unreadable image: %s", exn)
            continue
        images.append(item["image"])
        labels.append(item["label"])
        if len(images) == n:
            break
    if not images:
        raise DataError(f"no readable image in {urls[:3]}...")
    return torch.stack(images), torch.stack(labels)


def cache_beside(url: str, name: str) -> Path:
    """Where to cache something derived from the shards at `url` (e.g. evaluation's classifier): beside
    a local shard; for a remote one, under ~/.cache/gannet/ (XDG_CACHE_HOME), in a folder named by the
    shards' prefix, since the store itself may be read-only to training jobs."""
    if not remote.is_remote(url):
        return Path(url).parent / name
    import hashlib

    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gannet"
    folder = root / hashlib.sha256(remote.parent(url).encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def shards_exist(pattern: str) -> bool:
    """Whether a shard pattern names anything (local or remote), without raising."""
    try:
        return bool(expand_urls(pattern))
    except ConfigError:
        return False


def heldout_beside(shards: str) -> str:
    """`val-*.tar` in the folder (or under the prefix) of the first training shard: the held-out split
    `gannet shards` writes."""
    first = expand_urls(shards)[0]
    if remote.is_remote(first):
        return f"{remote.parent(first)}/val-*.tar"
    return str(Path(first).parent / "val-*.tar")


class ShardExamples:
    """The run's real data as a recipe may read it (the `Examples` of the recipe contract): files
    stay on this side, so recipes never open shards themselves."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def images(self, n: int) -> dict[str, torch.Tensor]:
        """The first `n` readable images of each stream: the same real inputs for every sample grid
        of a run (keys as in a batch)."""
        return {key: first_images(paths, self.cfg.data, n)[0] for key, paths in zip(("image", "image_b"), stream_urls(self.cfg.data))}

    def captions(self, n: int, source: str = "") -> list[tuple[str, int]]:
        """Captions of `source`, else of the held-out split (unseen captions), else of the training shards."""
        pattern = source or self.cfg.eval.heldout
        if not pattern:
            beside = heldout_beside(self.cfg.data.shards)
            pattern = beside if shards_exist(beside) else self.cfg.data.shards
        return first_captions(expand_urls(pattern), n)
