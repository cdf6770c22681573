"""`gannet eval`: the offline extractor separates real from noise, the memorization check flags a
copying generator and passes a trained one, and the report lands in eval.json."""

from __future__ import annotations

import json

import torch
from PIL import Image

from gannet.trainer.config.loader import load_config
from gannet.trainer.data.stream import expand_urls, first_images
from gannet.trainer.evaluation.evaluate import Evaluator, classifier_for, memorization
from gannet.trainer.evaluation.metrics import frechet_distance
from gannet.trainer.tracking.tracker import read_metrics
from tests.conftest import gannet, tiny_overrides, without_perf


def test_fid_of_held_out_real_is_small_and_of_noise_is_large(mnist_shards, tmp_path):
    cfg = load_config("lsgan_mnist", [f"data.shards={mnist_shards}/train-*.tar"])
    train = first_images(expand_urls(cfg.data.shards), cfg.data, 10_000)
    heldout = first_images(expand_urls(f"{mnist_shards}/val-*.tar"), cfg.data, 500)
    cache = mnist_shards / ".gannet-classifier.safetensors"  # where `gannet eval` keeps it: trained once per session
    classifier, accuracy = classifier_for(cfg, train, heldout, cache)
    assert accuracy > 0.9  # a real digit classifier, trained offline on the 4,500 real digits
    noise = torch.rand(500, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        feats = {k: classifier.features(v).double().numpy() for k, v in
                 {"train": train[0], "heldout": heldout[0], "noise": noise}.items()}
    real_vs_heldout = frechet_distance(feats["train"], feats["heldout"])
    real_vs_noise = frechet_distance(feats["train"], feats["noise"])
    assert real_vs_heldout * 20 < real_vs_noise
    assert classifier_for(cfg, train, heldout, cache)[1] == accuracy  # served from the cache


def test_condition_accuracy_comes_with_what_real_images_score_and_its_interval(mnist_shards):
    """A conditional G is judged by a classifier that errs on real digits too: the score carries the
    classifier's accuracy on the real training and held-out sets, and its 95% interval."""
    cfg = load_config("cgan_mnist", [f"data.shards={mnist_shards}/train-*.tar", "eval.samples=500"])
    evaluator = Evaluator(cfg)
    images, labels = evaluator.train
    real = evaluator.score(images[:400], labels[:400])  # a "generator" that returns real training digits
    seen = evaluator.extractor.classify(evaluator.train_feats[:400])
    assert real["condition_accuracy"] == (seen == labels[:400]).float().mean().item() > 0.9
    assert set(real["condition_accuracy_real"]) == {"train", "heldout"}
    assert abs(real["condition_accuracy_real"]["train"] - real["condition_accuracy"]) < 0.05  # a sample of the same set
    heldout_seen = evaluator.extractor.classify(evaluator.heldout_feats)
    assert 0.9 < real["condition_accuracy_real"]["heldout"] == (heldout_seen == evaluator.heldout[1]).float().mean().item()
    p = real["condition_accuracy"]
    assert real["condition_accuracy_ci95"] == 1.96 * (p * (1 - p) / 400) ** 0.5
    wrong = evaluator.score(images[:400], (labels[:400] + 1) % 10)  # every sample asked for another class
    assert wrong["condition_accuracy"] < 0.1 and wrong["condition_accuracy_real"] == real["condition_accuracy_real"]


def test_memorization_check_flags_copies_and_passes_new_images(mnist_shards):
    cfg = load_config("lsgan_mnist", [f"data.shards={mnist_shards}/train-*.tar"])
    train, _ = first_images(expand_urls(cfg.data.shards), cfg.data, 2000)
    heldout, _ = first_images(expand_urls(f"{mnist_shards}/val-*.tar"), cfg.data, 300)
    features = lambda x: torch.nn.functional.avg_pool2d(x, 4).flatten(1)  # noqa: E731  (any fixed feature map)
    copies = train[:300] + 0.01 * torch.randn(300, 1, 28, 28)  # a "generator" that returns training images
    flagged = memorization(copies, train, heldout, {"generated": features(copies), "train": features(train), "heldout": features(heldout)})
    assert flagged["verdict"] == "memorizes the training set" and flagged["pixel"]["ratio"] < 0.1
    fresh = first_images(expand_urls(f"{mnist_shards}/train-000008.tar"), cfg.data, 300)[0]  # real digits not in `train`
    passed = memorization(fresh, train, heldout, {"generated": features(fresh), "train": features(train), "heldout": features(heldout)})
    assert passed["verdict"] == "no sign of memorization" and passed["pixel"]["ratio"] > 0.7


def test_in_training_eval_and_eval_cli_report(mnist_shards, tmp_path):
    run = tmp_path / "run"
    gannet("train", "lsgan_mnist", *tiny_overrides(mnist_shards, run, **{"train.steps": 60, "eval.every": 30, "eval.samples": 200}))
    during = [r for r in read_metrics(run) if "eval/fid" in r]
    assert [r["step"] for r in during] == [30, 60] and all(r["eval/fid"] > 0 for r in during)
    out = gannet("eval", str(run), "--n", "300", "--steps", "all")
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["checkpoint"] == "step-00000060" and report["samples"] == 300
    assert [r["step"] for r in report["over_steps"]] == [30, 45, 60]  # FID over the kept checkpoints (newest 3)
    assert report["fid"] > report["fid_heldout_reference"] >= 0  # 60 steps of a tiny GAN is not yet real data
    assert 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1 and sum(report["class_counts"]) == 300
    assert report["memorization"]["verdict"] == "no sign of memorization"
    assert report["equilibrium"]["equilibrium"] == {"loss_d": 0.25, "d_real": 0.5, "d_fake": 0.5, "separation": 1.0}
    assert (run / "eval" / "memorization.png").exists() and "FID" in out.stdout
    assert Image.open(run / "eval" / "report.png").size[0] > 800
    # Evaluating does not change what is trained: the same run without it logs the same losses.
    gannet("train", "lsgan_mnist", *tiny_overrides(mnist_shards, tmp_path / "plain", **{"train.steps": 60}))
    trained = lambda r: [row for row in without_perf(read_metrics(r)) if "train/loss_d" in row]  # noqa: E731
    assert trained(tmp_path / "plain") == trained(run)


def test_inception_extractor_needs_its_file_and_uses_it(mnist_shards, tmp_path):
    """The real FID Inception file cannot be downloaded here, so a TorchScript stand-in with the same
    call signature (uint8 RGB in, `return_features=True` -> (N, 2048)) checks the plumbing."""
    run = tmp_path / "run"
    gannet("train", "lsgan_mnist", *tiny_overrides(mnist_shards, run, **{"train.steps": 10}))
    missing = gannet("train", "lsgan_mnist", *tiny_overrides(mnist_shards, tmp_path / "r2", **{
        "train.steps": 10, "eval.every": 5, "eval.extractor": "inception"}), check=False)
    assert missing.returncode == 2 and "needs the standard FID Inception file" in missing.stderr

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3 * 16 * 16, 2048)

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            small = torch.nn.functional.interpolate(x.float() / 255, size=(16, 16), mode="bilinear")
            return self.proj(small.flatten(1))

    torch.jit.script(StandIn()).save(str(tmp_path / "inception.pt"))
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("extractor: classifier", "extractor: inception").replace(
        "inception: ''", f"inception: {tmp_path / 'inception.pt'}"))
    gannet("eval", str(run), "--n", "100")
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["extractor"]["kind"] == "inception" and "class_counts" not in report and report["fid"] > 0


def test_divergence_warning_needs_a_rise_on_the_scale_of_ds_outputs(tmp_path):
    """A hinge G loss wandering around 0 (values seen in a healthy cgan run) is no trend; a
    non-saturating G loss climbing from log 2 to 4 is G losing ground, and the warning says from
    where to where (a drift, not a divergence: the spike detector flags neither, and eval agrees)."""
    from types import SimpleNamespace

    from gannet.trainer.evaluation.evaluate import equilibrium

    def warnings(loss_g: list[float], separation: float) -> list[str]:
        rows = [{"step": 50 * i, "train/loss_d": 0.9, "train/loss_g": v, "train/d_real": 0.1, "train/d_fake": -0.1}
                for i, v in enumerate(loss_g)]
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        game = SimpleNamespace(equilibrium=lambda: {"loss_d": 1.0, "d_real": 0.0, "d_fake": 0.0, "separation": separation})
        return equilibrium(tmp_path, game)["warnings"]

    assert warnings([0.05, -0.2, 0.1, 0.3, 0.02, 0.4, -0.1, 0.08, 0.3, 0.5], separation=2.0) == []  # 10x the first
    (warning,) = warnings([0.7, 0.69, 0.72, 0.8, 0.75, 2.5, 3.1, 3.6, 3.9, 4.0], separation=1.0)
    assert warning == "G losing ground: G's loss rose from 0.732 to 3.42 over the recent window"
