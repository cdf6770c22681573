"""Shards streamed from an S3-compatible store and from a web server, against real servers on
loopback (tests/object_store.py): naming and listing, retries of transient failures counted and
invisible in the data, exact resume, skipped shards within the error budget, credentials errors
in one line (exit 2), `gannet shards --out s3://`, and 2-process training runs from each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gannet.trainer.checkpoint.statefile import load_state
from gannet.trainer.config.schema import DataConfig
from gannet.trainer.data import remote
from gannet.trainer.data.shards import bundled_mnist, on_each_shard, write_mnist_shards
from gannet.trainer.data.stream import (
    DataStream,
    StreamPosition,
    cache_beside,
    expand_urls,
    heldout_beside,
    shard_samples,
    shards_exist,
)
from gannet.trainer.errors import ConfigError, DataError
from tests.conftest import REPO, tiny_overrides, write_idx
from tests.object_store import FlakyServer, S3Store, clean_aws_env

BIN = Path(sys.executable).parent
BUCKET = "shards"


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_shards):
    """The S3 server, with the 6 small shards under s3://shards/small/."""
    server = S3Store(tmp_path_factory.mktemp("moto") / "moto.log")
    server.upload(small_shards, BUCKET, "small/")
    yield server
    server.close()


@pytest.fixture
def aws(monkeypatch):
    """Point this process's AWS settings at `env` (a test server), and make gannet build new clients."""

    def use(env: dict[str, str]) -> None:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            if key.startswith("AWS_"):
                monkeypatch.setenv(key, value)
        remote._s3_client.cache_clear()

    yield use
    remote._s3_client.cache_clear()


def data_cfg(shards: str, **kw) -> DataConfig:
    return DataConfig(shards=shards, **{"batch_size": 16, "num_workers": 0, "shuffle_buffer": 50, "retry_backoff_s": 0.01, **kw})


def batches(stream: DataStream, n: int) -> list[torch.Tensor]:
    return [next(stream)["image"] for _ in range(n)]


S3_SHARDS = f"s3://{BUCKET}/small/train-{{000000..000005}}.tar"


def test_s3_brace_pattern_glob_and_prefix_listing_name_the_same_shards(store, aws):
    aws(store.env)
    names = [f"s3://{BUCKET}/small/train-{i:06d}.tar" for i in range(6)]
    assert expand_urls(S3_SHARDS) == names
    assert expand_urls(f"s3://{BUCKET}/small/") == names
    assert expand_urls(f"s3://{BUCKET}/small/train-00000[0-2].tar") == names[:3]
    with pytest.raises(ConfigError, match="no shard in the object store matches"):
        expand_urls(f"s3://{BUCKET}/elsewhere/")
    assert heldout_beside(S3_SHARDS) == f"s3://{BUCKET}/small/val-*.tar"  # eval.heldout's default, in the store
    assert shards_exist(S3_SHARDS) and not shards_exist(heldout_beside(S3_SHARDS))  # no val split uploaded here


def test_derived_files_of_remote_shards_are_cached_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = cache_beside(f"s3://{BUCKET}/small/train-000000.tar", "classifier.safetensors")
    assert cache.parent.is_dir() and cache.parent.parent == tmp_path / "gannet"
    assert cache == cache_beside(f"s3://{BUCKET}/small/train-000003.tar", "classifier.safetensors")  # per prefix
    assert cache != cache_beside(f"s3://{BUCKET}/other/train-000000.tar", "classifier.safetensors")
    assert cache_beside("/data/x/train-000000.tar", "c") == Path("/data/x/c")


def test_endpoint_and_credentials_from_an_aws_profile(store, aws, tmp_path):
    (tmp_path / "config").write_text(f"[profile lab]\nendpoint_url = {store.endpoint}\nregion = us-east-1\n")
    (tmp_path / "credentials").write_text(f"[lab]\naws_access_key_id = {store.key_id}\naws_secret_access_key = {store.secret}\n")
    aws(clean_aws_env(AWS_CONFIG_FILE=str(tmp_path / "config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "credentials"),
                      AWS_PROFILE="lab"))
    assert len(expand_urls(f"s3://{BUCKET}/small/")) == 6


def test_s3_stream_through_a_flaky_server_equals_the_local_stream_and_resumes_exactly(store, aws, small_shards):
    """One request in five fails (503, reset, body cut in half): every failure is retried and
    counted, and the batches are bit-identical to the local shards', before and after a resume."""
    local_cfg = data_cfg(f"{small_shards}/train-*.tar", num_workers=2)
    reference = batches(DataStream(expand_urls(local_cfg.shards), local_cfg, rank=0, world=1, seed=0), 50)
    proxy = FlakyServer(upstream=store.endpoint, every=5)
    try:
        aws({**store.env, "AWS_ENDPOINT_URL": proxy.url})
        cfg = data_cfg(S3_SHARDS, num_workers=2)
        urls = expand_urls(cfg.shards, remote.RetryPolicy(cfg.retries, cfg.retry_backoff_s))
        first = DataStream(urls, cfg, rank=0, world=1, seed=0)
        got = batches(first, 20)  # crosses the first epoch (600 samples / 16)
        saved = first.position.state_dict()
        resumed = DataStream(urls, cfg, rank=0, world=1, seed=0, position=StreamPosition.from_state(saved))
        got += batches(resumed, 30)
    finally:
        proxy.close()
    assert all(torch.equal(a, b) for a, b in zip(got, reference)), "remote batches differ from the local ones"
    assert min(proxy.failed.values()) > 0, proxy.failed  # each kind of failure happened
    assert resumed.position.errors == 0  # nothing was skipped: every failure was transient
    assert resumed.position.retries >= saved["retries"] > 0  # counted, and carried over the resume


def test_http_stream_with_cut_bodies_and_resets_equals_the_local_stream(small_shards, aws):
    local_cfg = data_cfg(f"{small_shards}/train-*.tar")
    reference = batches(DataStream(expand_urls(local_cfg.shards), local_cfg, rank=0, world=1, seed=0), 40)
    server = FlakyServer(root=small_shards, every=3)  # reads are ~1 MB: most shards are retried mid-body
    try:
        cfg = data_cfg(f"{server.url}/train-{{000000..000005}}.tar")
        stream = DataStream(expand_urls(cfg.shards), cfg, rank=0, world=1, seed=0)
        got = batches(stream, 40)
    finally:
        server.close()
    assert all(torch.equal(a, b) for a, b in zip(got, reference))
    assert server.failed["cut"] > 0 and stream.position.retries >= server.failures - 1 > 0
    assert stream.position.errors == 0


def test_a_shard_that_keeps_failing_is_skipped_counted_and_budgeted(small_shards, caplog):
    server = FlakyServer(root=small_shards, always_fail=("train-000003",))
    try:
        cfg = data_cfg(f"{server.url}/train-{{000000..000005}}.tar", retries=2)
        stream = DataStream(expand_urls(cfg.shards), cfg, rank=0, world=1, seed=0)
        images = batches(stream, 40)  # more than one pass over the 5 readable shards
        assert all(b.shape == (16, 1, 28, 28) for b in images)
        assert stream.position.errors >= 1 and stream.position.retries >= 2
        assert "gave up after 3 attempts" in caplog.text
        strict = data_cfg(cfg.shards, retries=1, max_errors=0)
        with pytest.raises(DataError, match="over the budget data.max_errors=0"):
            batches(DataStream(expand_urls(strict.shards), strict, rank=0, world=1, seed=0), 40)
    finally:
        server.close()


def test_http_servers_cannot_be_listed_and_missing_files_are_named(small_shards):
    server = FlakyServer(root=small_shards)
    try:
        with pytest.raises(ConfigError, match="a web server cannot be listed"):
            expand_urls(f"{server.url}/")
        with pytest.raises(ConfigError, match="HTTP 404.*no such file on the server"):
            expand_urls(f"{server.url}/nothing-{{0..3}}.tar")
    finally:
        server.close()


@pytest.mark.parametrize("case, env_change, message", [
    ("unknown key", {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWNUNKNOWN00"}, "InvalidAccessKeyId"),
    ("wrong secret", {"AWS_SECRET_ACCESS_KEY": "wrong"}, "SignatureDoesNotMatch"),
    ("no credentials", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, "Unable to locate credentials"),
    ("no bucket", {}, "NoSuchBucket"),
])
def test_bad_credentials_or_bucket_are_one_line_and_exit_2(store, aws, case, env_change, message):
    env = {k: v for k, v in {**store.env, **env_change}.items() if v is not None}
    shards = f"s3://{'missing-bucket' if case == 'no bucket' else BUCKET}/small/train-{{000000..000005}}.tar"
    aws(env)
    with pytest.raises(ConfigError, match=message):
        expand_urls(shards)
    if case in ("wrong secret", "no credentials"):  # the CLI: one line on stderr, exit 2
        result = subprocess.run([sys.executable, "-m", "gannet", "train", "lsgan_mnist", f"data.shards={shards}",
                                 "log.wandb=disabled"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, result.stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith("gannet: error: s3://") and message in lines[0], lines


def test_gannet_shards_writes_straight_to_the_store_and_replaces_a_split_whole(store, aws, tmp_path):
    pixels, labels = bundled_mnist()
    write_idx(tmp_path / "images-idx3-ubyte", pixels[:600])  # 600 real digits: a quick conversion
    write_idx(tmp_path / "labels-idx1-ubyte", labels[:600])
    store.client().create_bucket(Bucket="written")
    proxy = FlakyServer(upstream=store.endpoint, every=5)  # uploads are retried too (by the SDK)
    env = {**store.env, "AWS_ENDPOINT_URL": proxy.url, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    workdir = tmp_path / "work"
    workdir.mkdir()
    try:
        for size in (200, 250):  # 3 train shards, then 2: the third must go
            result = subprocess.run([sys.executable, "-m", "gannet", "shards", "mnist", "--out", "s3://written/mnist/",
                                     "--images", str(tmp_path / "images-idx3-ubyte"), "--labels",
                                     str(tmp_path / "labels-idx1-ubyte"), "--holdout", "100", "--shard-size", str(size)],
                                    cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
            assert "to s3://written/mnist/" in result.stdout
    finally:
        proxy.close()
    assert proxy.failures > 0
    keys = sorted(o["Key"] for o in store.client().list_objects_v2(Bucket="written")["Contents"])
    assert keys == ["mnist/train-000000.tar", "mnist/train-000001.tar", "mnist/val-000000.tar"]  # no stale shards
    assert not list(workdir.iterdir())  # nothing left behind locally
    aws(store.env)
    samples = list(shard_samples([f"s3://written/{k}" for k in keys], handler=lambda e: False))
    assert len(samples) == 600 and len({s["__key__"] for s in samples}) == 600  # every shard whole


def test_each_shard_is_handed_over_as_soon_as_it_is_closed(tmp_path):
    """What `--out s3://` relies on to keep local disk at about one shard: the callback sees each
    finished shard alone (the uploader deletes it before the next one is written)."""
    pixels, labels = bundled_mnist()
    write_idx(tmp_path / "images-idx3-ubyte", pixels[:300])
    write_idx(tmp_path / "labels-idx1-ubyte", labels[:300])
    seen: list[tuple[str, int]] = []

    def upload(path: str) -> None:
        seen.append((Path(path).name, len(list(Path(path).parent.glob("*.tar")))))
        Path(path).unlink()

    with on_each_shard(upload):
        counts = write_mnist_shards(tmp_path / "out", images=tmp_path / "images-idx3-ubyte",
                                    labels=tmp_path / "labels-idx1-ubyte", shard_size=100, holdout=100)
    assert counts == {"val": 1, "train": 2}
    assert seen == [("val-000000.tar", 1), ("train-000000.tar", 1), ("train-000001.tar", 1)]


def test_bad_credentials_for_gannet_shards_out_exit_2_before_converting(store, tmp_path):
    env = {**store.env, "AWS_SECRET_ACCESS_KEY": "wrong", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "gannet", "shards", "mnist", "--out", f"s3://{BUCKET}/x/"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("gannet: error: s3://"), result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("source", ["s3", "http"])
def test_two_processes_train_from_a_flaky_remote_store(store, small_shards, tmp_path, source):
    """A 2-process run (accelerate, gloo) streams from the store while one request in five fails:
    it trains to the end, nothing is skipped, and the retries are in the saved data positions."""
    from gannet.trainer.engine.distributed import free_port

    server = (FlakyServer(upstream=store.endpoint, every=3) if source == "s3"
              else FlakyServer(root=small_shards, every=3))
    shards = S3_SHARDS if source == "s3" else f"{server.url}/train-{{000000..000005}}.tar"
    run_dir = tmp_path / "run"
    env = {**store.env, "AWS_ENDPOINT_URL": server.url, "ACCELERATE_USE_CPU": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    overrides = tiny_overrides(small_shards, run_dir, **{"data.shards": shards, "train.steps": 8, "train.log_every": 4,
                                                         "train.sample_every": 8, "train.checkpoint_every": 8,
                                                         "data.retry_backoff_s": 0.05})
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "gannet", "train", "lsgan_mnist", *overrides]
    try:
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr[-5000:]
    final = run_dir / "checkpoints" / "step-00000008"
    positions = [load_state(final / f"rank{r}")["data"] for r in (0, 1)]
    assert server.failures > 0
    assert sum(p["errors"] for p in positions) == 0
    assert sum(p["retries"] for p in positions) > 0


def test_bench_loader_times_local_disk_beside_the_s3_store(store, small_shards, tmp_path):
    out = tmp_path / "loader.json"
    result = subprocess.run([sys.executable, "-m", "gannet", "bench", "loader", "lsgan_mnist", f"s3://{BUCKET}/small/",
                             f"data.shards={small_shards}/train-*.tar", "data.batch_size=16", "--steps", "12",
                             "--out", str(out)], cwd=REPO, env=store.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    local, s3 = json.loads(out.read_text())["loader"]
    assert (local["kind"], s3["kind"]) == ("local", "s3") and s3["source"] == f"s3://{BUCKET}/small/"
    assert local["images_per_s"] > 0 and s3["images_per_s"] > 0 and local["batches"] == s3["batches"] == 12
    assert "images/s" in result.stdout and f"s3://{BUCKET}/small/" in result.stdout
