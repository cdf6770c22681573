"""Loader throughput (`gannet bench loader [CONFIG] [SHARDS ...]`): images/s the data stream alone delivers.

The training stream itself (gannet.trainer.data.stream: shard reads, shuffle buffer, decode, batching in the
loader workers), with no model, timed on the config's `data.shards` and on each other shard
source given (an `s3://` prefix, an `http(s)://` pattern, another folder), so a remote store can
be compared with local disk on the same machine. Sources are timed in turns, a block of batches
each, so that all of them see the same machine load. `loader_throughput` times one config's whole
training stream (both domains of unpaired data) for `gannet bench speed`'s loader ratio.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gannet.trainer.config.schema import Config, DataConfig
from gannet.trainer.data import remote
from gannet.trainer.data.stream import DataStream, expand_urls, open_stream, stream_urls


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
