"""`gannet eval`: the offline extractor separates real from noise, the memorization check flags a
copying generator and passes a trained one, and the report lands in eval.json."""

from __future__ import annotations

import json

import torch

from tests.conftest import gannet, tiny_overrides
from trainer.config import load_config
from trainer.evaluate import classifier_for, load_images, memorization
from trainer.metrics import frechet_distance


def test_fid_of_held_out_real_is_small_and_of_noise_is_large(mnist_shards, tmp_path):
    cfg = load_config("lsgan_mnist", [f"data.shards={mnist_shards}/train-*.tar"])
    train = load_images(cfg.data.shards, cfg, limit=10_000)
    heldout = load_images(f"{mnist_shards}/val-*.tar", cfg, limit=500)
    classifier, accuracy = classifier_for(cfg, train, heldout, tmp_path / "clf.safetensors")
    assert accuracy > 0.9  # a real digit classifier, trained offline on the 4,500 real digits
    noise = torch.rand(500, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        feats = {k: classifier.features(v).double().numpy() for k, v in
                 {"train": train[0], "heldout": heldout[0], "noise": noise}.items()}
    real_vs_heldout = frechet_distance(feats["train"], feats["heldout"])
    real_vs_noise = frechet_distance(feats["train"], feats["noise"])
    assert real_vs_heldout * 20 < real_vs_noise
    assert classifier_for(cfg, train, heldout, tmp_path / "clf.safetensors")[1] == accuracy  # served from the cache


def test_memorization_check_flags_copies_and_passes_new_images(mnist_shards):
    cfg = load_config("lsgan_mnist", [f"data.shards={mnist_shards}/train-*.tar"])
    train, _ = load_images(cfg.data.shards, cfg, limit=2000)
    heldout, _ = load_images(f"{mnist_shards}/val-*.tar", cfg, limit=300)
    features = lambda x: torch.nn.functional.avg_pool2d(x, 4).flatten(1)  # noqa: E731  (any fixed feature map)
    copies = train[:300] + 0.01 * torch.randn(300, 1, 28, 28)  # a "generator" that returns training images
    flagged = memorization(copies, train, heldout, {"generated": features(copies), "train": features(train), "heldout": features(heldout)})
    assert flagged["verdict"] == "memorizes the training set" and flagged["pixel"]["ratio"] < 0.1
    fresh = load_images(f"{mnist_shards}/train-000008.tar", cfg, limit=300)[0]  # real digits not in `train`
    passed = memorization(fresh, train, heldout, {"generated": features(fresh), "train": features(train), "heldout": features(heldout)})
    assert passed["verdict"] == "no sign of memorization" and passed["pixel"]["ratio"] > 0.7


def test_eval_cli_reports_a_trained_run(mnist_shards, tmp_path):
    run = tmp_path / "run"
    gannet("train", "lsgan_mnist", *tiny_overrides(mnist_shards, run, **{"train.steps": 60}))
    out = gannet("eval", str(run), "--n", "300")
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["checkpoint"] == "step-00000060" and report["samples"] == 300
    assert report["fid"] > report["fid_heldout_reference"] >= 0  # 60 steps of a tiny GAN is not yet real data
    assert 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1 and sum(report["class_counts"]) == 300
    assert report["memorization"]["verdict"] == "no sign of memorization"
    assert report["equilibrium"]["equilibrium"] == {"loss_d": 0.25, "d_real": 0.5, "d_fake": 0.5, "separation": 1.0}
    assert (run / "eval" / "memorization.png").exists() and "FID" in out.stdout
