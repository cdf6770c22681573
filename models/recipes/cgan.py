"""Class-conditional GAN (Mirza & Osindero 2014): D sees the label as one-hot planes beside the image
(`model.discriminator: concat`, as cgan_mnist) or through a projection (`projection`, Miyato & Koyama 2018).

G(z, y) and D(x, y) see the class label y; the game is the GAN's (non-saturating, minimax or hinge),
played per class, so one generator learns every class's distribution and `gannet sample
--label 7` draws sevens. Fakes in D's step carry the labels of the real batch beside them, so D
judges real and fake images of the same classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import nn

from gannet.models import conditional  # noqa: F401  (registers the conditional networks)
from gannet.models.recipes import register
from gannet.models.recipes.base import GeneratorInput
from gannet.models.recipes.gan import GAN, GANParams
from gannet.trainer.errors import ConfigError, DataError


@dataclass
class CGANParams(GANParams):
    name: ClassVar[str] = "cgan"


def check_networks(recipe_name: str, nets: dict[str, nn.Module], generators: tuple[type, ...], discriminators: tuple[type, ...]) -> None:
    """A conditional recipe needs networks that take its condition: say so at start-up, not as a
    forward() argument error in the first step."""
    for key, allowed, section in (("G", generators, "model.generator"), ("D", discriminators, "model.discriminator")):
        if not isinstance(nets[key], allowed):
            raise ConfigError(f"recipe.name={recipe_name} needs a conditional {section} "
                              f"(got {type(nets[key]).__name__}; use one of {', '.join(c.__name__ for c in allowed)})")


@register
class ConditionalGAN(GAN):
    Params = CGANParams
    condition = "label"

    def build(self) -> dict[str, nn.Module]:
        nets = super().build()
        check_networks("cgan", nets, (conditional.LabelGenerator,), (conditional.ProjectionDiscriminator, conditional.ConcatDiscriminator))
        return nets

    def conditions(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        label = inputs["label"]
        if label.min() < 0 or label.max() >= self.cfg.model.num_classes:
            raise DataError(f"cgan needs class labels in [0, model.num_classes={self.cfg.model.num_classes}) in every "
                            f"sample (the .cls field); got labels {label.min().item()}..{label.max().item()}")
        return (label,)

    def generator_inputs(self) -> tuple[GeneratorInput, ...]:
        return (*super().generator_inputs(), GeneratorInput("label", "label", (), classes=self.cfg.model.num_classes))

    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Noise plus classes in turn (0, 1, ..., 9, 0, ...): grids and evaluations cover every class."""
        return {**super().fixed_inputs(n, generator), "label": torch.arange(n) % self.cfg.model.num_classes}

    def captions(self, inputs: Mapping[str, torch.Tensor]) -> list[str]:
        return [f"class {int(y)}" for y in inputs["label"]]
