"""Hyper-parameters that move with the images seen: R3GAN's cosine schedule with warm-up.

R3GAN (Huang et al. 2024) anneals every hyper-parameter of its game over the images G has
learned from, as one cosine from a base to a final value over `total` images (its
`cosine_decay_with_warmup`): the learning rate and Adam's beta2 (gannet.trainer.engine.setup,
the engine's side, since a recipe never sees optimizers) and the penalty weight gamma, the EMA
half-life and the augmentation probability (gannet.models.recipes.r3gan). A large gamma early
keeps D smooth while G is far from the data; a small one late lets D see fine detail.
"""

from __future__ import annotations

import math


def cosine_decay_with_warmup(images: float, base: float, final: float, total: float, *, warmup: float = 0.0,
                             warmup_value: float = 0.0, hold: float = 0.0) -> float:
    """The value after `images` images: linear from `warmup_value` to `base` over the first `warmup`
    images, `base` for `hold` more, then half a cosine down (or up) to `final` at `total`, and
    `final` after it. R3GAN's formula, term for term; total <= warmup + hold is refused."""
    span = total - warmup - hold
    if span <= 0:
        raise ValueError(f"the cosine needs total ({total}) > warmup ({warmup}) + hold ({hold})")
    if images > total:
        return float(final)
    if images < warmup:
        return warmup_value + (base - warmup_value) * images / warmup
    if images <= warmup + hold:
        return float(base)
    decay = 0.5 * (1 + math.cos(math.pi * (images - warmup - hold) / span))
    return base + (1 - decay) * (final - base)
