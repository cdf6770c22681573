"""Shards and the WebDataset stream: real MNIST in, disjoint per-rank reads, exact positions, bad data skipped."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from gannet.trainer.config.schema import DataConfig
from gannet.trainer.data.shards import bundled_mnist, read_idx, write_mnist_shards
from gannet.trainer.data.stream import DataStream, ShardStream, StreamPosition, expand_urls, tar_members
from gannet.trainer.errors import ConfigError, DataError
from tests.conftest import corrupt_copy, write_idx


def data_cfg(shards: Path, **kw) -> DataConfig:
    return DataConfig(shards=f"{shards}/train-*.tar", **{"batch_size": 16, "num_workers": 0, "shuffle_buffer": 50, **kw})


def test_bundled_mnist_shards_hold_real_labelled_digits(mnist_shards):
    assert len(expand_urls(f"{mnist_shards}/train-{{000000..000008}}.tar")) == 9
    samples = list(wds.WebDataset(str(mnist_shards / "val-000000.tar"), shardshuffle=False).decode("l8"))
    assert len(samples) == 500
    labels = [int(s["cls"]) for s in samples]
    assert set(labels) == set(range(10))  # shuffled before the split: every class in the held-out set
    pixels = np.stack([s["png"] for s in samples])
    assert pixels.shape == (500, 28, 28) and pixels.dtype == np.uint8
    assert 0.1 < (pixels > 127).mean() < 0.3  # white strokes on black, like MNIST


def test_idx_files_convert_to_the_same_digits(tmp_path):
    pixels, labels = bundled_mnist()
    write_idx(tmp_path / "img-idx3-ubyte.gz", pixels[:120])
    write_idx(tmp_path / "lbl-idx1-ubyte", labels[:120])
    assert (read_idx(tmp_path / "img-idx3-ubyte.gz") == pixels[:120]).all()
    counts = write_mnist_shards(tmp_path / "out", images=tmp_path / "img-idx3-ubyte.gz", labels=tmp_path / "lbl-idx1-ubyte",
                                shard_size=50, holdout=20)
    assert counts == {"val": 1, "train": 2}
    got = {int(s["__key__"]): (s["png"], int(s["cls"]))
           for s in wds.WebDataset(str(tmp_path / "out" / "*.tar").replace("*", "{train-000000,train-000001,val-000000}"),
                                   shardshuffle=False).decode("l8")}
    assert sorted(got) == list(range(120))
    assert all((img == pixels[i]).all() and cls == labels[i] for i, (img, cls) in got.items())


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    pixels, _ = bundled_mnist()
    write_idx(tmp_path / "img", pixels[:10])
    (tmp_path / "img").write_bytes((tmp_path / "img").read_bytes()[:-100])
    with pytest.raises(ConfigError, match="is truncated"):
        read_idx(tmp_path / "img")


def keys_of_one_pass(shards: Path, rank: int, world: int, workers: int) -> list[str]:
    """Sample keys rank `rank` reads in epoch 0, over all its loader workers."""
    cfg = data_cfg(shards, num_workers=workers)
    stream = ShardStream(expand_urls(cfg.shards), cfg, rank=rank, world=world, seed=0, position=StreamPosition.start(workers))
    return [key for w in range(workers) for url in stream.shards_for(0, w)
            for key in (s["__key__"] for s in wds.WebDataset(url, shardshuffle=False))]


def test_ranks_and_workers_read_disjoint_shards_covering_the_set(small_shards):
    per_rank = [keys_of_one_pass(small_shards, rank, world=2, workers=3) for rank in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) + len(per_rank[1]) == 600 == len(set(per_rank[0]) | set(per_rank[1]))


def test_too_few_shards_for_ranks_times_workers_is_an_error(small_shards):
    cfg = data_cfg(small_shards, num_workers=4)
    with pytest.raises(DataError, match="6 shard\\(s\\) cannot feed 2 rank\\(s\\) x 4 loader worker\\(s\\)"):
        DataStream(expand_urls(cfg.shards), cfg, rank=0, world=2, seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_stream_resumes_exactly_from_a_saved_position(small_shards, workers):
    cfg = data_cfg(small_shards, num_workers=workers)
    urls = expand_urls(cfg.shards)
    full = DataStream(urls, cfg, rank=0, world=1, seed=0)
    reference = [next(full)["image"] for _ in range(60)]  # 600 samples / 16 per batch: crosses epochs
    first = DataStream(urls, cfg, rank=0, world=1, seed=0)
    for _ in range(23):
        next(first)
    saved = first.position.state_dict()
    resumed = DataStream(urls, cfg, rank=0, world=1, seed=0, position=StreamPosition.from_state(saved))
    for i in range(23, 60):
        assert torch.equal(next(resumed)["image"], reference[i]), f"batch {i} differs after resume"


def test_corrupt_shards_are_skipped_counted_and_budgeted(small_shards, tmp_path, caplog):
    corrupt_copy(small_shards, tmp_path / "bad")
    cfg = data_cfg(tmp_path / "bad")
    stream = DataStream(expand_urls(cfg.shards), cfg, rank=0, world=1, seed=0)
    batches = [next(stream) for _ in range(80)]  # ~2 passes over what is readable
    assert all(b["image"].shape == (16, 1, 28, 28) and torch.isfinite(b["image"]).all() for b in batches)
    assert stream.position.errors >= 4  # per pass: the truncated tar and the junk PNG
    assert "skipped unreadable shard data" in caplog.text
    strict = data_cfg(tmp_path / "bad", max_errors=1)
    stream = DataStream(expand_urls(strict.shards), strict, rank=0, world=1, seed=0)
    with pytest.raises(DataError, match="over the budget data.max_errors=1"):
        for _ in range(80):
            next(stream)


def test_missing_shards_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no file matches"):
        expand_urls(f"{tmp_path}/train-{{000000..000003}}.tar")


def test_shards_smaller_than_one_batch_are_an_error_not_a_hang(small_shards):
    cfg = data_cfg(small_shards, batch_size=128, num_workers=0)  # each rank of 6 sees 100 samples per pass
    stream = DataStream(expand_urls(cfg.shards), cfg, rank=0, world=6, seed=0)
    with pytest.raises(DataError, match="read 100 usable sample\\(s\\) in a whole pass .* fewer than data.batch_size=128"):
        next(stream)


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_lean_tar_reader_reads_what_webdatasets_reads_and_refuses_a_damaged_header(tmp_path, tar_format):
    """Local shards are read from their headers (tar_members), not through tarfile: the same members
    as WebDataset's reader (long names, folders, metadata skipped), and a flipped header byte or a
    cut is a DataError (one counted error for the shard), never a silently shorter shard."""
    from webdataset.tariterators import tar_file_iterator

    path, rng = tmp_path / "t.tar", np.random.default_rng(0)
    with tarfile.open(path, "w", format=tar_format) as tar:
        for i, name in enumerate(["k1.png", "k1.cls", "deep/" + "x" * 150 + ".jpg", "__key__", "k2.txt"]):
            data = rng.integers(0, 256, 700 * i + 3, dtype=np.uint8).tobytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    with open(path, "rb") as ours, open(path, "rb") as theirs:
        assert [(m["fname"], m["data"]) for m in tar_members(ours, str(path))] == \
               [(m["fname"], m["data"]) for m in tar_file_iterator(theirs)]
    raw = bytearray(path.read_bytes())
    damaged = tmp_path / "damaged.tar"
    raw[512 * 2 + 130] ^= 0x01  # inside the second member's header (its size field)
    damaged.write_bytes(raw)
    with open(damaged, "rb") as f, pytest.raises(DataError, match="damaged tar header"):
        list(tar_members(f, str(damaged)))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(path.read_bytes()[:2000])
    with open(cut, "rb") as f, pytest.raises(DataError, match="truncated"):
        list(tar_members(f, str(cut)))
