"""The original GAN (Goodfellow et al. 2014): minimax or non-saturating generator loss.

D minimises the cross-entropy of telling real from fake; we report it averaged over the two
terms, so a discriminator at equilibrium (D = 1/2 everywhere) sits at log 2. The minimax G
minimises log(1 - D(G(z))), whose gradient vanishes while D wins early in training; the
non-saturating G maximises log D(G(z)) instead, same fixed point, strong early gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from gannet.models.recipes import register
from gannet.models.recipes.base import AdversarialParams, AdversarialRecipe


@dataclass
class GANParams(AdversarialParams):
    name: ClassVar[str] = "gan"
    # the game's loss. nonsaturating: G maximises log D(G(z)); minimax: G minimises log(1 - D(G(z)))
    # (the paper's game; its gradient vanishes early); hinge (Lim & Ye; Miyato et al.): D minimises
    # E relu(1 - D(x)) + E relu(1 + D(G(z))), G maximises E D(G(z)).
    loss: Literal["nonsaturating", "minimax", "hinge"] = "nonsaturating"


@register
class GAN(AdversarialRecipe):
    Params = GANParams

    def real_term(self, out: torch.Tensor) -> torch.Tensor:
        """D's loss for outputs that should say "real" (real images; matching captions)."""
        if self.params.loss == "hinge":
            return F.relu(1 - out).mean()
        return F.binary_cross_entropy_with_logits(out, torch.ones_like(out))

    def fake_term(self, out: torch.Tensor) -> torch.Tensor:
        """D's loss for outputs that should say "fake" (fakes; mismatched captions)."""
        if self.params.loss == "hinge":
            return F.relu(1 + out).mean()
        return F.binary_cross_entropy_with_logits(out, torch.zeros_like(out))

    def d_loss(self, real_out: torch.Tensor, fake_out: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.real_term(real_out) + self.fake_term(fake_out))

    def g_loss(self, fake_out: torch.Tensor) -> torch.Tensor:
        if self.params.loss == "hinge":
            return -fake_out.mean()
        if self.params.loss == "minimax":
            # log(1 - D(G(z))) = -BCE(logit, 0); minimising it is G's side of the minimax game.
            return -F.binary_cross_entropy_with_logits(fake_out, torch.zeros_like(fake_out))
        return F.binary_cross_entropy_with_logits(fake_out, torch.ones_like(fake_out))

    def equilibrium(self) -> dict[str, float]:
        if self.params.loss == "hinge":  # D's score 0 on both: each hinge term is 1; margins at -1 and +1
            return {"loss_d": 1.0, "d_real": 0.0, "d_fake": 0.0, "separation": 2.0}
        return {"loss_d": math.log(2), "d_real": 0.5, "d_fake": 0.5, "separation": 1.0}

    def d_stat(self, out: torch.Tensor) -> torch.Tensor:
        """D(x) on the dashboards: a probability for the cross-entropy losses, the raw score for hinge."""
        return out.mean() if self.params.loss == "hinge" else torch.sigmoid(out).mean()
