"""`gannet eval RUN_DIR`: sample quality, memorization and equilibrium, all offline.

- Features come from a digit classifier gannet trains on the run's own training shards and caches
  beside them (no download, no Inception weights needed); FID/KID and precision/recall are computed
  on its penultimate layer, and its predictions give class coverage (mode collapse shows as
  missing classes) and, for conditional G, how often G shows the class asked, beside how often the
  classifier itself is right on real images (it errs on odd digits, so ~97% is data-level on MNIST).
- The memorization check answers "does it copy the training set?": each generated image's nearest
  training image (pixels and features) against the same distance for held-out real images, which
  the generator never saw. Copies sit much closer to the training set than held-out data does.
- The equilibrium report compares the run's recent D(x), D(G(z)) and D loss to the values the
  recipe's game converges to (log 2 for the GAN's D loss; the midpoint of a and b for LSGAN).
  Whether the run diverged is the divergence guard's verdict (gannet.trainer.guard), not a second
  opinion: the rollbacks and spikes it counted during training, and its spike detector replayed
  over the logged losses with the run's own thresholds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gannet.models.recipes.base import Recipe
from gannet.trainer.config.schema import Config, TrainConfig
from gannet.trainer.data.captions import attribute_agreement
from gannet.trainer.data.stream import cache_beside, expand_urls, first_images, heldout_beside
from gannet.trainer.errors import ConfigError, GannetError
from gannet.trainer.evaluation.classifier import DigitClassifier, cached_classifier
from gannet.trainer.evaluation.images import save_grid
from gannet.trainer.evaluation.metrics import frechet_distance, kernel_inception_distance, nearest_neighbours, precision_recall
from gannet.trainer.evaluation.report import write_report
from gannet.trainer.evaluation.sampling import load_networks, open_run
from gannet.trainer.evaluation.translation import evaluate_translation
from gannet.trainer.guard import SpikeDetector, watched
from gannet.trainer.tracking.tracker import read_metrics

log = logging.getLogger("gannet")


def classifier_for(cfg: Config, train: tuple[torch.Tensor, torch.Tensor], heldout: tuple[torch.Tensor, torch.Tensor],
                   cache: Path) -> tuple[DigitClassifier, float]:
    """The cached digit classifier for these shards, trained on first use; returns it and held-out accuracy."""
    if not cache.exists() and (train[1] < 0).any():
        raise GannetError("the offline feature extractor needs class labels (.cls) in the training shards")
    return cached_classifier(cfg, train, heldout, cache, "offline feature extractor")


class ClassifierFeatures:
    """gannet's own offline extractor: the digit classifier's penultimate layer, and its labels."""

    def __init__(self, model: DigitClassifier, accuracy: float):
        self.model, self.info = model, {"kind": "digit classifier", "heldout_accuracy": accuracy}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images.float())

    def classify(self, features: torch.Tensor) -> torch.Tensor | None:
        return self.model.head(features).argmax(1)


class InceptionFeatures:
    """The standard FID features: the 2048-d pool3 of the TF-ported InceptionV3 that StyleGAN2-ADA
    ships as TorchScript (inception-2015-12-05.pt). It takes uint8 RGB of any size and resizes
    to 299 itself; gannet only converts [-1, 1] images (grey repeated to RGB)."""

    def __init__(self, path: str):
        self.model, self.info = torch.jit.load(path).eval(), {"kind": "inception", "path": path}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
        if pixels.shape[1] == 1:
            pixels = pixels.repeat(1, 3, 1, 1)
        return torch.cat([self.model(part, return_features=True) for part in pixels.split(100)])

    def classify(self, features: torch.Tensor) -> torch.Tensor | None:
        return None


def memorization(generated: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor,
                 features: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Nearest-training-image distances of generated vs held-out real images, in pixels and features.

    Held-out images are real data the generator never saw; their distance to the training set is
    what "new" looks like. A generator counts as copying when its median distance is under half of
    the held-out median, or more than 5% of its samples are closer than the closest 1% of held-out.
    """
    out: dict[str, Any] = {}
    flat = lambda x: x.flatten(1).float()  # noqa: E731
    spaces = {"pixel": (flat(generated), flat(train), flat(heldout)),
              "feature": (features["generated"], features["train"], features["heldout"])}
    for space, (gen, ref, held) in spaces.items():
        gen_d, _ = nearest_neighbours(gen, ref)
        held_d, _ = nearest_neighbours(held, ref)
        floor = torch.quantile(held_d, 0.01)
        out[space] = {
            "generated_median": gen_d.median().item(), "heldout_median": held_d.median().item(),
            "ratio": (gen_d.median() / held_d.median()).item(),
            "near_copies": (gen_d < floor).float().mean().item(),
        }
    copying = any(v["ratio"] < 0.5 or v["near_copies"] > 0.05 for v in out.values())
    out["verdict"] = "memorizes the training set" if copying else "no sign of memorization"
    return out


def equilibrium(run_dir: Path, recipe: Recipe, window: int = 10) -> dict[str, Any]:
    """Recent D statistics against the game's equilibrium, with warnings a user can act on."""
    rows = [r for r in read_metrics(run_dir) if "train/loss_d" in r][-window:]  # eval records share the file
    recent = {k: float(np.mean([r[f"train/{k}"] for r in rows])) for k in ("loss_d", "loss_g", "d_real", "d_fake")}
    target = recipe.equilibrium()
    warnings = []
    if recent["d_real"] - recent["d_fake"] > 0.8 * target["separation"]:
        warnings.append("discriminator collapse: D separates real from fake almost perfectly; G gets little signal")
    # Halves of the window, not two single records, and a rise on the scale of D's outputs: a hinge
    # G loss (-D(G(z))) wanders around 0, where "it tripled" is noise.
    # A drift, not a divergence: that is the guard's verdict, below.
    if len(rows) >= 4:
        loss_g = [r["train/loss_g"] for r in rows]
        older, newer = float(np.mean(loss_g[: len(rows) // 2])), float(np.mean(loss_g[len(rows) // 2:]))
        if newer - older > target["separation"] and newer > 3 * max(older, 1e-8):
            warnings.append(f"G losing ground: G's loss rose from {older:.3g} to {newer:.3g} over the recent window")
    guard = divergence(run_dir, getattr(recipe, "cfg", None))
    return {"recent": recent, "equilibrium": target, "warnings": warnings + guard.pop("warnings"), "divergence": guard}


def divergence(run_dir: Path, cfg: Config | None) -> dict[str, Any]:
    """The divergence guard's account of a run: what it counted while training (the last logged
    train/rollbacks, train/spikes, train/nonfinite_steps), and the logged steps its spike detector
    flags when replayed over metrics.jsonl with the run's thresholds (every step's values where the
    run logged every step, as the live detector saw them), with a warning for each kind."""
    train = cfg.train if cfg is not None else TrainConfig()
    rows = [r for r in read_metrics(run_dir) if "train/loss_d" in r]
    counted = {key: int(rows[-1].get(f"train/{key}", 0)) if rows else 0 for key in ("rollbacks", "spikes", "nonfinite_steps")}
    detector, flagged = SpikeDetector(train.spike_window, train.spike_threshold, train.spike_ratio), []
    for row in rows:
        spikes = detector.check(watched({k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("train/")}))
        flagged += [{"step": row["step"], "spike": spike.text()} for spike in spikes]
    warnings = []
    if counted["rollbacks"]:
        warnings.append(f"rolled back {counted['rollbacks']} time(s) by the divergence guard ({counted['spikes']} spike(s), "
                        f"{counted['nonfinite_steps']} skipped non-finite step(s); train.log says where and why): its "
                        f"learning rates were lowered x{train.rollback_lr_factor} each time")
    if flagged:
        warnings.append(f"loss spike(s) at logged step(s) {', '.join(str(f['step']) for f in flagged[:5])}: {flagged[0]['spike']}")
    return {**counted, "rolled_back": counted["rollbacks"] > 0, "replayed_spikes": flagged, "warnings": warnings}


class Evaluator:
    """The real-data side of every evaluation of a run, computed once: images and features of the
    training and held-out sets. `score` then rates any batch of generated images."""

    def __init__(self, cfg: Config):
        self.train = first_images(expand_urls(cfg.data.shards), cfg.data, 10_000)
        self.heldout = first_images(expand_urls(cfg.eval.heldout or heldout_beside(cfg.data.shards)), cfg.data, cfg.eval.samples)
        if cfg.eval.extractor == "inception":
            self.extractor: ClassifierFeatures | InceptionFeatures = InceptionFeatures(cfg.eval.inception)
        else:
            cache = cache_beside(expand_urls(cfg.data.shards)[0], ".gannet-classifier.safetensors")
            self.extractor = ClassifierFeatures(*classifier_for(cfg, self.train, self.heldout, cache))
        with torch.no_grad():
            self.train_feats = self.extractor.features(self.train[0])
            self.heldout_feats = self.extractor.features(self.heldout[0])
        self.fid_reference = frechet_distance(self.train_feats.double().numpy(), self.heldout_feats.double().numpy())
        # What "follows its condition" can reach: the classifier's own accuracy on real images. A G
        # that matched its training data would score the first; a higher score means fewer odd samples.
        self.real_condition: dict[str, float] = {}
        for name, feats, labels in (("train", self.train_feats, self.train[1]), ("heldout", self.heldout_feats, self.heldout[1])):
            seen = self.extractor.classify(feats)
            if seen is not None and (labels >= 0).all():
                self.real_condition[name] = (seen == labels).float().mean().item()

    def score(self, generated: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        """Quality of `generated`; with the classes they were asked for (`labels`, -1 = none), also
        how often the independent classifier sees that class: whether G follows its condition."""
        with torch.no_grad():
            feats = self.extractor.features(generated)
        real, fake = self.train_feats.double().numpy(), feats.double().numpy()
        kid, kid_std = kernel_inception_distance(real, fake)
        precision, recall = precision_recall(self.train_feats, feats)
        result: dict[str, Any] = {
            "samples": len(generated), "extractor": self.extractor.info, "fid": frechet_distance(real, fake),
            "fid_heldout_reference": self.fid_reference, "kid": kid, "kid_std": kid_std,
            "precision": precision, "recall": recall,
            "memorization": memorization(generated, self.train[0], self.heldout[0],
                                         {"generated": feats, "train": self.train_feats, "heldout": self.heldout_feats}),
        }
        classes = self.extractor.classify(feats)
        if classes is not None:
            counts = torch.bincount(classes, minlength=10).tolist()
            result.update(class_counts=counts, classes_covered=sum(c >= 0.02 * len(generated) for c in counts))
            asked = labels >= 0 if labels is not None else None
            if asked is not None and asked.any():
                hit = (classes[asked] == labels[asked]).float().mean().item()
                result.update(condition_accuracy=hit, condition_accuracy_ci95=1.96 * (hit * (1 - hit) / int(asked.sum())) ** 0.5,
                              condition_accuracy_real=self.real_condition)
        return result

    @staticmethod
    def scalars(result: dict[str, Any]) -> dict[str, float]:
        """The numbers for metrics.jsonl and W&B (eval/...)."""
        keys = ("fid", "kid", "precision", "recall", "classes_covered", "condition_accuracy")
        out = {f"eval/{k}": float(result[k]) for k in keys if k in result}
        out.update({f"eval/caption_{k}": v for k, v in result.get("caption_agreement", {}).items()})
        out["eval/memorization_ratio_pixel"] = result["memorization"]["pixel"]["ratio"]
        return out


def generate(recipe: Recipe, nets: dict[str, nn.Module], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """n samples in chunks (on the CPU), from noise seeded apart from the training grids' fixed
    noise; for conditional runs also the class each was asked for (-1 = none) and its caption."""
    noise = torch.Generator().manual_seed(seed)
    images, labels, captions = [], [], []
    with torch.no_grad():
        for part in torch.arange(n).split(250):
            inputs = recipe.fixed_inputs(len(part), noise)
            images.append(recipe.generate(nets, inputs))
            labels += [inputs["label"]] if "label" in inputs else []
            captions += recipe.captions(inputs)
    return torch.cat(images), torch.cat(labels) if labels else None, captions


def caption_agreement(images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Text-to-image on 28-px digits: do the strokes, slant and width follow the caption's words?"""
    pixels = ((images[:, 0].float() + 1) * 127.5).clamp(0, 255).numpy()
    return attribute_agreement(pixels, captions)


def evaluate(run_dir: Path, *, n: int | None = None, heldout_pattern: str | None = None,
             steps: str = "latest", raw: bool = False) -> dict[str, Any]:
    """`gannet eval`: score checkpoints (the latest, `all` kept ones, or listed steps), then draw the
    memorization grid and the report for the last of them. A run that keeps an EMA of G is scored
    on it, unless `raw`."""
    cfg, recipe, kept = open_run(run_dir, {k: v for k, v in {"samples": n, "heldout": heldout_pattern}.items() if v})
    recipe.sample_raw = raw
    wanted = [max(kept)] if steps == "latest" else sorted(kept) if steps == "all" else sorted(int(x) for x in steps.split(","))
    missing = [s for s in wanted if s not in kept]
    if missing:
        raise ConfigError(f"--steps: no checkpoint for step(s) {missing} in {run_dir} (kept: {sorted(kept)})")
    if recipe.translates:  # CycleGAN: held-out translations, both ways; and the divergence guard's account
        over_steps = []
        for step in wanted:  # the grid and eval.json are the last (latest) step's
            result = evaluate_translation(run_dir, cfg, recipe, kept[step], load_networks(recipe, kept[step]))
            over_steps.append({"step": step, **{k: v for k, v in result.items() if isinstance(v, float)}})
        result.update(over_steps=over_steps, divergence=divergence(run_dir, cfg))
        (run_dir / "eval" / "eval.json").write_text(json.dumps(result, indent=2))
        return result
    evaluator = Evaluator(cfg)
    over_steps = []
    for step in wanted:
        nets = load_networks(recipe, kept[step])
        generated, labels, captions = generate(recipe, nets, cfg.eval.samples, seed=12345)
        scores = evaluator.score(generated, labels)
        if recipe.condition == "text" and cfg.data.image_size == 28 and cfg.data.channels == 1:
            scores["caption_agreement"] = caption_agreement(generated, captions)
        over_steps.append({"step": step, **Evaluator.scalars(scores)})
    ema = "G_ema" in nets and not raw
    result = {"checkpoint": kept[wanted[-1]].name, "generator": "G_ema" if ema else "G", **scores, "over_steps": over_steps,
              "equilibrium": equilibrium(run_dir, recipe)}
    if result.get("classes_covered", 10) < 10:
        result["equilibrium"]["warnings"].append(
            f"mode collapse: only {result['classes_covered']} of 10 classes have >= 2% of the samples {result['class_counts']}")
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    _, nearest = nearest_neighbours(generated[:16].flatten(1), evaluator.train[0].flatten(1))
    pairs = torch.stack([generated[:16], evaluator.train[0][nearest]], 1).flatten(0, 1)
    save_grid(pairs, out_dir / "memorization.png", nrow=8)  # each sample beside its nearest training image
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    write_report(run_dir, result)
    return result
