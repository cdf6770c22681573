"""End-to-end runs of the real CLI on real shards: every recipe trains, a SIGKILLed run resumes to
bit-identical weights, corrupt shards are survived and reported, W&B offline files hold the metrics."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from gannet.models.recipes import discover
from gannet.trainer.checkpoint.statefile import load_state
from gannet.trainer.tracking.tracker import read_metrics as metrics
from gannet.trainer.tracking.wandb_files import find_run_files, read_history, read_media_files
from tests.conftest import (
    REPO,
    corrupt_copy,
    gannet,
    kill_when,
    tiny_overrides,
    without_perf,
)


def bundled_config(recipe: str) -> Path:
    """The smallest config under configs/ that trains `recipe`: every registered recipe ships one."""
    found = [(raw.get("data", {}).get("image_size", 28), raw.get("data", {}).get("channels", 1), path)
             for path in sorted((REPO / "configs").glob("*.yaml"))
             if ((raw := yaml.safe_load(path.read_text())).get("recipe") or {}).get("name") == recipe]
    assert found, f"recipe {recipe} has no config in configs/: a new GAN is one recipe module plus one YAML"
    return min(found)[-1]


@pytest.mark.parametrize("recipe", sorted(discover()))
def test_every_registered_recipe_trains_on_real_shards(recipe, mnist_shards, silhouettes, tmp_path):
    """Read from the registry: a recipe module added under models/recipes/ is trained here with its config."""
    config, run = bundled_config(recipe), tmp_path / "run"
    data = yaml.safe_load(config.read_text())["data"]
    shards = ({"data.shards": f"{silhouettes['small']}/a-*.tar", "data.shards_b": f"{silhouettes['small']}/b-*.tar"}
              if data.get("shards_b") else {"data.shards": f"{mnist_shards}/train-*.tar"})
    overrides = {**shards, "data.batch_size": 8, "model.g_width": 16, "model.d_width": 16, "train.steps": 10,
                 "train.log_every": 5, "train.sample_every": 10, "train.checkpoint_every": 10, "train.num_samples": 16,
                 "optim.g.schedule": "constant", "optim.d.schedule": "constant", "log.wandb": "disabled", "run_dir": run}
    gannet("train", str(config), *[f"{k}={v}" for k, v in overrides.items()])
    rows = metrics(run)
    assert [r["step"] for r in rows] == [5, 10]
    assert all(math.isfinite(r[k]) for r in rows for k in ("train/loss_d", "train/loss_g", "train/d_real", "train/d_fake"))
    final = run / "checkpoints" / "step-00000010"
    assert {f"{name}.safetensors" for name in load_state(final / "shared")["networks"]} <= {p.name for p in final.iterdir()}
    # drawn, not blank (a blank grid has std 0; a tanh G such as r3gan_mnist's learns the black
    # background within these 10 steps, so its faint strokes give std ~5)
    assert np.asarray(Image.open(run / "samples" / "step-00000010.png")).std() > 2


@pytest.mark.parametrize("config, extra", [
    ("gan_mnist", {"recipe.loss": "minimax", "recipe.d_steps": 2}),
    ("lsgan_mnist", {"log.wandb": "offline"}),
])
def test_gan_variants_train_and_wandb_mirrors_the_metrics(mnist_shards, tmp_path, config, extra):
    run = tmp_path / "run"
    gannet("train", config, *tiny_overrides(mnist_shards, run, **extra))
    rows = metrics(run)
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert all(math.isfinite(r[k]) for r in rows for k in ("train/loss_d", "train/loss_g", "train/d_real", "train/d_fake"))
    for step in (15, 30):
        grid = np.asarray(Image.open(run / "samples" / f"step-{step:08d}.png"))
        assert grid.shape == (8 * 30 + 2, 8 * 30 + 2) and grid.std() > 10  # 64 digits of 28 px, not a blank image
    if extra.get("log.wandb") == "offline":
        (wandb_file,) = find_run_files(run)
        history = {row["_step"]: row for row in read_history(wandb_file)}
        for row in rows:  # W&B mirrors metrics.jsonl value for value
            for key in ("train/loss_d", "train/loss_g", "train/d_real", "train/d_fake"):
                assert history[row["step"]][key] == pytest.approx(row[key], rel=1e-6)
        assert history[15]["samples/fixed_noise/_type"] == "image-file"
        assert len(read_media_files(run)) == 2  # the step-15 and step-30 grids


def test_sigkill_then_resume_is_bit_identical(small_shards, tmp_path):
    overrides = lambda run: tiny_overrides(small_shards, run, **{  # noqa: E731
        "train.steps": 60, "train.checkpoint_every": 10, "train.sample_every": 30, "data.num_workers": 2})
    gannet("train", "lsgan_mnist", *overrides(tmp_path / "straight"))

    killed = tmp_path / "killed"
    kill_when([sys.executable, "-m", "gannet", "train", "lsgan_mnist", *overrides(killed)],
              (killed / "checkpoints" / "step-00000020").exists)
    assert not (killed / "checkpoints" / "step-00000060").exists()

    resumed = gannet("train", "lsgan_mnist", *overrides(killed), "resume=auto")
    assert "resumed" in resumed.stderr and "at step 60" not in resumed.stderr.split("resumed")[1].splitlines()[0]
    final_a, final_b = (run / "checkpoints" / "step-00000060" for run in (tmp_path / "straight", killed))
    for name in ("G", "D"):
        a, b = load_file(str(final_a / f"{name}.safetensors")), load_file(str(final_b / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), f"{name} weights differ"
    opt_a, opt_b = (load_state(p / "shared")["engine"]["optimizers"]["G"]["state"] for p in (final_a, final_b))
    assert all((opt_a[i]["exp_avg_sq"] == opt_b[i]["exp_avg_sq"]).all() for i in opt_a)
    # one history, no repeated or missing steps, and the same numbers as the uninterrupted run
    assert without_perf(metrics(killed)) == without_perf(metrics(tmp_path / "straight"))


def test_corrupt_shard_is_skipped_and_reported(small_shards, tmp_path):
    corrupt_copy(small_shards, tmp_path / "bad")
    run = tmp_path / "run"
    result = gannet("train", "lsgan_mnist", *tiny_overrides(tmp_path / "bad", run, **{"train.steps": 40}))
    assert "skipped unreadable shard data" in result.stderr
    skipped = metrics(run)[-1]["data/skipped"]
    assert skipped >= 2 and (run / "checkpoints" / "step-00000040").is_dir()
    over = gannet("train", "lsgan_mnist", *tiny_overrides(tmp_path / "bad", tmp_path / "strict",
                                                          **{"train.steps": 40, "data.max_errors": 1}), check=False)
    assert over.returncode == 1
    assert over.stderr.strip().splitlines()[-1].startswith("gannet: error: 2 corrupt samples/shards skipped, over the budget")


def test_existing_run_is_not_overwritten_and_sample_cli_draws_from_it(small_shards, tmp_path):
    run = tmp_path / "run"
    gannet("train", "lsgan_mnist", *tiny_overrides(small_shards, run, **{"train.steps": 15}))
    again = gannet("train", "lsgan_mnist", *tiny_overrides(small_shards, run, **{"train.steps": 15}), check=False)
    assert again.returncode == 2 and "add resume=auto" in again.stderr
    gannet("resume", str(run), "train.steps=20")
    assert metrics(run)[-1]["step"] == 20
    out = gannet("sample", str(run), "--out", str(tmp_path / "g.png"), "--n", "16")
    assert Image.open(tmp_path / "g.png").size == (4 * 30 + 2, 4 * 30 + 2) and "g.png" in out.stdout
