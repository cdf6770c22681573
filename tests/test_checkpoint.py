"""Checkpoints are atomic folders: complete or absent, pruned to the newest K, safe on a full disk;
each carries a manifest, and a damaged one is reported and skipped for the newest intact one."""

from __future__ import annotations

import logging
import re
import subprocess

import pytest
import torch

from gannet.trainer.checkpoint.store import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
    verify_run,
)
from gannet.trainer.errors import GannetError


def save(run_dir, step, numel=1000, keep=3):
    weights = {"G": {"w": torch.full((numel,), float(step))}}
    shared = {"step": step, "networks": ["G"]}
    return save_checkpoint(run_dir, step, rank=0, barrier=lambda: None, weights=weights, shared=shared,
                           per_rank={"rng": torch.get_rng_state()}, keep=keep)


def test_save_load_and_keep_newest(tmp_path):
    for step in (10, 20, 30, 40):
        save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    weights, shared, own = load_checkpoint(latest_checkpoint(tmp_path), rank=0)
    assert shared["step"] == 40 and torch.equal(weights["G"]["w"], torch.full((1000,), 40.0))
    assert torch.equal(own["rng"], torch.get_rng_state())
    assert load_checkpoint(latest_checkpoint(tmp_path), rank=1)[2] is None  # a rank the run did not have


def test_half_written_checkpoint_is_never_the_latest(tmp_path):
    save(tmp_path, 10)
    partial = tmp_path / "checkpoints" / ".tmp-step-00000020"  # what a kill during a save leaves
    partial.mkdir()
    (partial / "G.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(tmp_path).name == "step-00000010"
    save(tmp_path, 20)  # the next save of that step replaces the debris
    assert latest_checkpoint(tmp_path).name == "step-00000020" and not partial.exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB tmpfs (we run as root in CI); skipped with the reason where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_keeps_the_previous_checkpoint(tiny_disk):
    save(tiny_disk, 10, numel=50_000)  # 200 kB fits
    with pytest.raises(GannetError, match=r"could not write checkpoint .*step-00000020: .*No space left on device.*; "
                                          r"the latest complete checkpoint .*step-00000010\) is intact"):
        save(tiny_disk, 20, numel=300_000)  # 1.2 MB does not
    assert [p.name for p in (tiny_disk / "checkpoints").iterdir()] == ["step-00000010"]  # no debris left
    weights, shared, _ = load_checkpoint(latest_checkpoint(tiny_disk), rank=0)
    assert shared["step"] == 10 and weights["G"]["w"].shape == (50_000,)


# -- manifests: every file's size and sha256, verified on resume ----------------------------------

def ckpt(run_dir, step):
    return run_dir / "checkpoints" / f"step-{step:08d}"


def save_with_engine_files(run_dir, step):
    """A checkpoint with nested per-rank files beside gannet's own, as DeepSpeed's engines write them."""
    def write_files(tmp):
        (tmp / "deepspeed_G" / "state").mkdir(parents=True)
        (tmp / "deepspeed_G" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 5000)
    weights = {"G": {"w": torch.full((1000,), float(step))}}
    return save_checkpoint(run_dir, step, rank=0, barrier=lambda: None, weights=weights, shared={"step": step, "networks": ["G"]},
                           per_rank={"rng": torch.get_rng_state()}, keep=3, write_files=write_files)


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    import hashlib
    import json

    path = save_with_engine_files(tmp_path, 10)
    listed = json.loads((path / "manifest.json").read_text())["files"]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(listed) == on_disk >= {"G.safetensors", "shared.json", "shared.safetensors", "rank0.json",
                                      "deepspeed_G/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"}
    for rel, entry in listed.items():
        data = (path / rel).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(path).status == "ok"


def truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, problem", [
    (lambda p: truncate(p / "G.safetensors"), r"G.safetensors has \d+ bytes, the manifest says \d+"),
    (lambda p: flip_one_byte(p / "deepspeed_G/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
     "deepspeed_G/state/zero_pp_rank_0_mp_rank_00_optim_states.pt does not match its sha256"),
    (lambda p: (p / "rank0.safetensors").unlink(), "rank0.safetensors is missing"),
    (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
    (lambda p: (p / "manifest.json").write_text("{not json"), "manifest.json is unreadable"),
    (lambda p: (p / "deepspeed_G" / "extra.pt").write_bytes(b"payload"), "deepspeed_G/extra.pt is not in the manifest"),
])
def test_damaged_latest_checkpoint_is_reported_and_skipped(tmp_path, caplog, damage, problem):
    for step in (10, 20):
        save_with_engine_files(tmp_path, step)
    damage(ckpt(tmp_path, 20))
    verdicts = verify_run(tmp_path)
    assert [v.status for v in verdicts] == ["ok", "damaged"]
    assert re.search(problem, verdicts[1].line()), verdicts[1].line()
    with caplog.at_level(logging.WARNING, logger="gannet"):
        assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 10)
    assert re.search(rf"checkpoint .*step-00000020 is damaged \(.*{problem}.*\): skipped", caplog.text)


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    save(tmp_path, 10)
    truncate(ckpt(tmp_path, 10) / "G.safetensors")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*checkpoints: all 1 are damaged"):
        latest_checkpoint(tmp_path)


def test_checkpoints_from_before_manifests_are_used_but_reported_unverified(tmp_path, caplog):
    for step in (10, 20):
        save(tmp_path, step)
        (ckpt(tmp_path, step) / "manifest.json").unlink()  # as an earlier gannet wrote them
    assert [v.status for v in verify_run(tmp_path)] == ["unverified", "unverified"]
    with caplog.at_level(logging.WARNING, logger="gannet"):
        assert latest_checkpoint(tmp_path) == ckpt(tmp_path, 20)
    assert "step-00000020 has no manifest (written by an earlier gannet): using it unverified" in caplog.text
    save(tmp_path, 30)  # the run continues under this version: old ones stay unverified, the new one is ok
    assert [v.status for v in verify_run(tmp_path)] == ["unverified", "unverified", "ok"]


def test_an_unreadable_unverified_checkpoint_is_one_clear_error(tmp_path):
    save(tmp_path, 10)
    (ckpt(tmp_path, 10) / "manifest.json").unlink()
    truncate(ckpt(tmp_path, 10) / "G.safetensors")
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*step-00000010: SafetensorError"):
        load_checkpoint(latest_checkpoint(tmp_path), rank=0)


def test_hashing_streams_in_chunks(tmp_path, monkeypatch):
    import hashlib

    import gannet.trainer.checkpoint.store as checkpoint

    data = bytes(range(256)) * 40_000  # 10 MB
    (tmp_path / "big").write_bytes(data)
    monkeypatch.setattr(checkpoint, "CHUNK", 4096)
    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
        def read(self, n):
            reads.append(n)
            return self.f.read(n)

    monkeypatch.setattr("builtins.open", lambda path, mode="r", *a, **k: Counting(real_open(path, mode, *a, **k)))
    assert checkpoint.file_sha256(tmp_path / "big") == hashlib.sha256(data).hexdigest()
    assert set(reads) == {4096} and len(reads) > 2000  # never the whole file at once
