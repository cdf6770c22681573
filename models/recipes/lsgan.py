"""Least Squares GAN (Mao et al. 2017).

D pushes its score for real images to b and for fakes to a; G pushes the score of its fakes to
c. With b - c = 1 and b - a = 2 (a=-1, b=1, c=0) the objective minimises the Pearson chi^2
divergence; the paper's 0-1 coding (a=0, b=1, c=1) is the default and works as well in practice.
Least-squares losses keep penalising fakes that are on the right side of the boundary but far
from the data, which gives G gradients where the sigmoid cross-entropy would saturate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from gannet.models.recipes import register
from gannet.models.recipes.base import AdversarialParams, AdversarialRecipe


@dataclass
class LSGANParams(AdversarialParams):
    name: ClassVar[str] = "lsgan"
    a: float = 0.0  # D's target for fakes
    b: float = 1.0  # D's target for real images
    c: float = 1.0  # G's target for its fakes


@register
class LSGAN(AdversarialRecipe):
    Params = LSGANParams

    def d_loss(self, real_out: torch.Tensor, fake_out: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((real_out - self.params.b) ** 2).mean() + 0.5 * ((fake_out - self.params.a) ** 2).mean()

    def g_loss(self, fake_out: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((fake_out - self.params.c) ** 2).mean()

    def decision_boundary(self) -> float:
        return (self.params.a + self.params.b) / 2

    def equilibrium(self) -> dict[str, float]:
        a, b = self.params.a, self.params.b
        mid = (a + b) / 2  # D's best answer when real and fake are the same distribution
        return {"loss_d": (b - a) ** 2 / 4, "d_real": mid, "d_fake": mid, "separation": abs(b - a)}
