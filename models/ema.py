"""An exponential moving average of the generator's weights (StyleGAN2-ADA's rule).

After every G step, G_ema <- beta * G_ema + (1 - beta) * G with

    beta = 0.5 ** (batch / half_life),  half_life = min(half_life_images, ramp_up * images_seen)

where `batch` is the images one G step consumed across all ranks: the average forgets half of
itself every `half_life_images` images, whatever the batch size, and early on (ramp-up) the
half-life is capped by a fraction of what G has seen, so the average does not hold on to the
random initial weights. Buffers (BatchNorm running statistics, spectral-norm vectors) are copied,
not averaged. Before `start` steps the average is G itself.
"""

from __future__ import annotations

import torch
from torch import nn


def ema_beta(batch: int, images_seen: int, half_life_images: float, ramp_up: float) -> float:
    """The decay of one update that consumes `batch` images after `images_seen` (before this step)."""
    half_life = half_life_images
    if ramp_up > 0:
        half_life = min(half_life, images_seen * ramp_up)
    return 0.5 ** (batch / max(half_life, 1e-8))


@torch.no_grad()
def update_average(average: nn.Module, current: nn.Module, beta: float) -> None:
    """average <- beta * average + (1 - beta) * current for parameters; buffers copied.

    `current` must hold full weights (under ZeRO-3 the caller gathers them first)."""
    for avg, p in zip(average.parameters(), current.parameters(), strict=True):
        avg.copy_(p.detach().to(avg.dtype).lerp(avg, beta))
    for avg, b in zip(average.buffers(), current.buffers(), strict=True):
        avg.copy_(b)
