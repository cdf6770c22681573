"""`gannet eval` for image-translation runs (CycleGAN): measured, not only looked at.

The held-out images of each domain (`testA/`, `testB/` beside the shards, as `gannet shards
silhouettes` / `unpaired` layouts write them; never trained on) are translated both ways, and:

- `translation_accuracy_ab` / `_ba`: how often an independent domain classifier, trained on the
  run's real training images of the two domains (as the digit classifier is for noise GANs, and
  cached beside the shards), says a translation belongs to its target domain;
- `fid_ab` / `fid_ba`: FID of the translations against the real training images of the target
  domain, in that classifier's penultimate features, beside the real-data floor `fid_ab_floor`: the
  same distance for the target domain's own held-out images (as many as the translations, so both
  carry the same small-sample bias), and `fid_ab_ratio` = translation / floor (1.0 = as real as
  real images, to these features); `kid_ab`, `kid_ab_floor` and `kid_ab_ratio` the same for KID
  (unbiased, but noisy on ~100 images: read its std, `kid_ab_std`);
- `cycle_l1_a` / `cycle_l1_b`: mean |G_BA(G_AB(a)) - a| (and the same from B) on held-out images,
  pixels in [-1, 1] as in training (so 0.10 is 5% of the pixel range).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gannet.models.recipes.base import Recipe
from gannet.trainer.config.schema import Config
from gannet.trainer.data.shards import image_files
from gannet.trainer.data.stream import cache_beside, expand_urls, first_images
from gannet.trainer.errors import GannetError
from gannet.trainer.evaluation.classifier import cached_classifier
from gannet.trainer.evaluation.images import save_grid
from gannet.trainer.evaluation.metrics import frechet_distance, kernel_inception_distance
from gannet.trainer.evaluation.sampling import decode_images

log = logging.getLogger("gannet")


def heldout_folder(cfg: Config, domain: str) -> Path:
    folder = Path(expand_urls(cfg.data.shards)[0]).parent / f"test{domain}"
    if not folder.is_dir():
        raise GannetError(f"gannet eval of a translation run needs held-out images in {folder} (as `gannet shards "
                          f"silhouettes` writes them): images of domain {domain} the run never trained on")
    return folder


def read_folder(folder: Path, cfg: Config) -> torch.Tensor:
    return decode_images(image_files(folder), cfg.data.image_size, cfg.data.channels)


def domain_classifier(cfg: Config, train: dict[str, torch.Tensor], heldout: dict[str, torch.Tensor]):
    """A to 0, B to 1: the digit classifier's network, trained once on the training images and cached
    beside the shards (a local cache folder for remote ones)."""

    def labelled(images: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.cat([images["A"], images["B"]]),
                torch.cat([torch.full((len(images[d]),), i, dtype=torch.long) for i, d in enumerate("AB")]))

    cache = cache_beside(expand_urls(cfg.data.shards)[0], ".gannet-domain-classifier.safetensors")
    return cached_classifier(cfg, labelled(train), labelled(heldout), cache, "domain classifier")


def evaluate_translation(run_dir: Path, cfg: Config, recipe: Recipe, checkpoint: Path, nets: dict) -> dict[str, Any]:
    """Translate both held-out folders with the checkpoint's generators and score them."""
    train = {"A": first_images(expand_urls(cfg.data.shards), cfg.data, 10_000)[0],
             "B": first_images(expand_urls(cfg.data.shards_b), cfg.data, 10_000)[0]}
    heldout = {d: read_folder(heldout_folder(cfg, d), cfg) for d in "AB"}
    model, accuracy = domain_classifier(cfg, train, heldout)
    result: dict[str, Any] = {"checkpoint": checkpoint.name, "extractor": {"kind": "domain classifier",
                              "heldout_accuracy": accuracy}, "heldout": {d: len(x) for d, x in heldout.items()}}
    grids = []
    with torch.no_grad():
        for source, target, there, back in (("A", "B", "AtoB", "BtoA"), ("B", "A", "BtoA", "AtoB")):
            real = heldout[source]
            fake = torch.cat([recipe.translate(nets, part, there) for part in real.split(100)])
            cycled = torch.cat([recipe.translate(nets, part, back) for part in fake.split(100)])
            key = f"{source}{target}".lower()
            hits = model(fake).argmax(1) == "AB".index(target)
            result[f"translation_accuracy_{key}"] = hits.float().mean().item()
            result.update(realism(key, *(model.features(x).double().numpy() for x in (train[target], heldout[target], fake))))
            result[f"cycle_l1_{source.lower()}"] = (cycled - real).abs().mean().item()
            grids.append(torch.stack([real[:8], fake[:8], cycled[:8]], 1).flatten(0, 1))
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    save_grid(torch.cat(grids), out_dir / "translations.png", nrow=6)  # real | translated | back, both ways
    (out_dir / "eval.json").write_text(json.dumps(result, indent=2))
    return result


def realism(key: str, train: np.ndarray, heldout: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    """How far translations land from the target domain's training images, beside how far its own
    held-out real images land (the floor a perfect translator reaches on this many images)."""
    out: dict[str, float] = {}
    fid, fid_floor = frechet_distance(train, fake), frechet_distance(train, heldout)
    (kid, kid_std), (kid_floor, _) = kernel_inception_distance(train, fake), kernel_inception_distance(train, heldout)
    out.update({f"fid_{key}": fid, f"fid_{key}_floor": fid_floor, f"fid_{key}_ratio": fid / max(fid_floor, 1e-12),
                f"kid_{key}": kid, f"kid_{key}_std": kid_std, f"kid_{key}_floor": kid_floor,
                f"kid_{key}_ratio": kid / kid_floor if kid_floor > 0 else float("inf")})
    return out
