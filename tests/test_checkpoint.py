"""Checkpoints are atomic folders: complete or absent, pruned to the newest K, safe on a full disk."""

from __future__ import annotations

import subprocess

import pytest
import torch

from trainer.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from trainer.errors import GannetError


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
