"""How real can a zebra -> horse translation that keeps the zebra's outline be, in `gannet eval`'s features?

`gannet eval` rates translations against the target domain's real floor: held-out horses against
training horses. But CycleGAN keeps the pose and outline of its input, and the zebras of this data
stand in other poses than its horses (many face the camera or graze). This script builds the floor
for "a real horse in a zebra's outline" from real images only:

1. Split the training horses into a reference half and a pool half (10 random splits).
2. Match each held-out zebra one-to-one (the Hungarian method; no horse used twice) to the pool
   horse whose filled silhouette overlaps its own most (IoU, either facing).
3. FID of those matched real horses against the reference half, over the FID of the held-out
   horses against it. The control: the same matching for the held-out horses (should be ~1x).
4. The same ratio for each run given: its G_BA's translations of the held-out zebras.

Usage (from the repository root, after `make train CONFIG=cyclegan_silhouettes`):
    python docs/analysis/outline_floor.py runs/cyclegan_silhouettes [more runs ...]
The result, measured, is in docs/results.md ("Zebra -> horse against the outline floor").
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from gannet.trainer.config.loader import load_config
from gannet.trainer.data.stream import expand_urls, first_images
from gannet.trainer.evaluation.metrics import frechet_distance
from gannet.trainer.evaluation.sampling import load_networks, open_run
from gannet.trainer.evaluation.translation import domain_classifier, heldout_folder, read_folder


def silhouettes(x: torch.Tensor) -> np.ndarray:
    """Filled foreground masks, flattened: a stripe is a dark gap inside the animal, so close, then fill."""
    return np.stack([ndimage.binary_fill_holes(ndimage.binary_closing(im > -0.6, np.ones((3, 3))))
                     for im in x[:, 0].numpy()]).reshape(len(x), -1).astype(np.float32)


def iou(queries: np.ndarray, pool: np.ndarray) -> np.ndarray:
    inter = queries @ pool.T
    return inter / (queries.sum(1)[:, None] + pool.sum(1)[None] - inter)


def matched(queries: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """One pool image per query, each used once, maximising the summed outline overlap (either facing)."""
    q, straight, flipped = silhouettes(queries), silhouettes(pool), silhouettes(pool.flip(3))
    a, b = iou(q, straight), iou(q, flipped)
    rows, cols = linear_sum_assignment(-np.maximum(a, b))
    out = pool[cols].clone()
    flip = b[rows, cols] > a[rows, cols]
    out[flip] = out[flip].flip(3)
    return out


def main(runs: list[str], splits: int = 10) -> None:
    cfg = load_config("cyclegan_silhouettes", [])
    train = {"A": first_images(expand_urls(cfg.data.shards), cfg.data, 10_000)[0],
             "B": first_images(expand_urls(cfg.data.shards_b), cfg.data, 10_000)[0]}
    held = {d: read_folder(heldout_folder(cfg, d), cfg) for d in "AB"}
    model, _ = domain_classifier(cfg, train, held)
    features = lambda x: model.features(x).double().numpy()  # noqa: E731
    translations = {}
    for run in runs:
        _, recipe, kept = open_run(Path(run), {})
        with torch.no_grad():
            translations[run] = recipe.translate(load_networks(recipe, kept[max(kept)]), held["B"], "BtoA")
    rng = np.random.default_rng(0)
    ratios = []
    with torch.no_grad():
        for _ in range(splits):
            order = rng.permutation(len(train["A"]))
            half = len(order) // 2
            reference, pool = features(train["A"][order[:half]]), train["A"][order[half:]]
            floor = frechet_distance(reference, features(held["A"]))
            sets = [matched(held["A"], pool), matched(held["B"], pool), *translations.values()]
            ratios.append([frechet_distance(reference, features(x)) / floor for x in sets])
    names = ["real horses in held-out horses' outlines (control)", "real horses in held-out zebras' outlines",
             *(f"{run}: G_BA(held-out zebras)" for run in runs)]
    print(f"FID / held-out horses' FID, {splits} splits of the training horses (reference / pool):")
    for name, mean, sd in zip(names, np.mean(ratios, 0), np.std(ratios, 0)):
        print(f"  {name}: {mean:.2f}x +- {sd:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
