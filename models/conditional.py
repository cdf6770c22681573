"""Conditional DCGAN networks: on a class label (Mirza & Osindero 2014; Miyato & Koyama 2018) and on
a sentence embedding (Reed et al. 2016, "Generative Adversarial Text to Image Synthesis").

Generators concatenate z with an embedding of the condition and run the DCGAN generator on it.
Discriminators reuse the DCGAN trunk (every layer but the last conv, which reduces the
base x base map to one logit) and differ in where the condition enters:
- `projection`: logit = head(h) + <embed(y), sum-pooled h>; the label only scores the features,
  which is what made class-conditional GANs scale (Miyato & Koyama).
- `concat`: one-hot label planes appended to the image channels (the original conditional GAN).
- `matching`: the sentence embedding is compressed (Linear + LeakyReLU), tiled over the
  base x base map, concatenated to h and mixed by a 1x1 conv before the head (Reed et al.); fed a
  real image with a mismatched caption, it learns to say "no", not only "fake".
- `text_projection`: the projection discriminator on a sentence: a two-layer MLP maps the
  embedding to a vector scored against the pooled features, logit = head(h) + <mlp(t), sum h>.
  The caption can only move the logit through what D sees in the image, so a wrong digit or slant
  costs directly; with GAN-CLS mismatches it is the stronger text path of the t2i recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gannet.models.networks import (
    DISCRIMINATORS,
    GENERATORS,
    DCGANDiscriminator,
    DCGANGenerator,
    d_batch_norm,
    dcgan_init,
    register,
)
from gannet.models.text import embedding_dim
from gannet.trainer.config.schema import DataConfig, ModelConfig
from gannet.trainer.errors import ConfigError


def _dcgan_trunk(model: ModelConfig, channels: int, image_size: int) -> tuple[nn.Sequential, nn.Conv2d, int]:
    """DCGAN D split into (trunk, head, trunk channels)."""
    layers = DCGANDiscriminator(model.d_width, channels, image_size, d_batch_norm(model)).net
    head = layers[-1]
    return nn.Sequential(*layers[:-1]), head, head.in_channels


def _check_classes(model: ModelConfig) -> int:
    if model.num_classes < 2:
        raise ConfigError(f"model.num_classes={model.num_classes} must be >= 2 for a label-conditional network")
    return model.num_classes


class LabelGenerator(nn.Module):
    """(z, class) -> image: a learned class embedding concatenated to z."""

    def __init__(self, model: ModelConfig, data: DataConfig):
        super().__init__()
        self.embed = nn.Embedding(_check_classes(model), model.cond_dim)
        self.net = DCGANGenerator(model.z_dim + model.cond_dim, model.g_width, data.channels, data.image_size, model.norm == "batch")

    def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, self.embed(label).to(z.dtype)], dim=1))


class ProjectionDiscriminator(nn.Module):
    def __init__(self, model: ModelConfig, data: DataConfig):
        super().__init__()
        self.trunk, self.head, width = _dcgan_trunk(model, data.channels, data.image_size)
        self.embed = nn.Embedding(_check_classes(model), width)
        nn.init.normal_(self.embed.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return self.head(h).flatten() + (self.embed(label).to(h.dtype) * h.sum(dim=(2, 3))).sum(dim=1)


class ConcatDiscriminator(nn.Module):
    def __init__(self, model: ModelConfig, data: DataConfig):
        super().__init__()
        self.classes = _check_classes(model)
        self.net = DCGANDiscriminator(model.d_width, data.channels + self.classes, data.image_size, d_batch_norm(model))

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        planes = F.one_hot(label, self.classes).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
        return self.net(torch.cat([x, planes], dim=1))


def text_standardizer(text_dim: int, norm: str) -> nn.Module:
    """`model.text_norm=batch`: each embedding dimension standardised over the batch (running
    statistics when sampling). Captions built from one template embed within a few degrees of each
    other (MiniLM: cosine 0.99 between "slanted to the left" and "... right"), so the words that
    matter move the raw vector by a few percent; standardised, they move it by about one unit.
    The captions' distribution does not drift, so the running statistics are a plain cumulative
    average (momentum None): exact from the first batch, where the default momentum would take
    ~100 steps to forget its initial variance of 1, ~1000x the embeddings' own."""
    return nn.BatchNorm1d(text_dim, affine=False, momentum=None) if norm == "batch" else nn.Identity()


class TextProjection(nn.Module):
    """Sentence embedding -> `cond_dim` conditioning vector, deterministic or with conditioning
    augmentation (StackGAN: sample c ~ N(mu, sigma) and pay KL(N(mu, sigma) || N(0, I)), which
    smooths the conditioning manifold when captions are few). Returns (c, KL per sample mean)."""

    def __init__(self, text_dim: int, cond_dim: int, augment: bool, norm: str = "none"):
        super().__init__()
        self.augment = augment
        self.norm = text_standardizer(text_dim, norm)
        self.fc = nn.Linear(text_dim, cond_dim * (2 if augment else 1))
        self.cond_dim = cond_dim

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fc(self.norm(text))
        if not self.augment:
            return F.leaky_relu(out, 0.2), out.new_zeros(())
        mu, logvar = out[:, : self.cond_dim], out[:, self.cond_dim :].clamp(-10, 10)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(dim=1).mean()
        c = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return c, kl


class TextGenerator(nn.Module):
    """(z, sentence embedding) -> (image, KL of the conditioning augmentation; 0 without it)."""

    def __init__(self, model: ModelConfig, data: DataConfig):
        super().__init__()
        self.text = TextProjection(embedding_dim(data.text_encoder), model.cond_dim, model.cond_aug, model.text_norm)
        self.net = DCGANGenerator(model.z_dim + model.cond_dim, model.g_width, data.channels, data.image_size, model.norm == "batch")

    def forward(self, z: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, kl = self.text(text.to(z.dtype))
        return self.net(torch.cat([z, c], dim=1)), kl


class MatchingDiscriminator(nn.Module):
    """(image, sentence embedding) -> one logit: does this image show this caption (and is it real)?
    The caption's layer is left out of spectral norm: it sees no image (see `spectral_normalize`)."""

    spectral_norm_exempt = ("text",)

    def __init__(self, model: ModelConfig, data: DataConfig):
        super().__init__()
        self.trunk, self.head, width = _dcgan_trunk(model, data.channels, data.image_size)
        self.text_norm = text_standardizer(embedding_dim(data.text_encoder), model.text_norm)
        self.text = nn.Linear(embedding_dim(data.text_encoder), model.cond_dim)
        layers: list[nn.Module] = [nn.Conv2d(width + model.cond_dim, width, 1, bias=not d_batch_norm(model))]
        layers += [nn.BatchNorm2d(width)] if d_batch_norm(model) else []
        self.joint = nn.Sequential(*layers, nn.LeakyReLU(0.2, True))
        self.joint.apply(dcgan_init)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        t = F.leaky_relu(self.text(self.text_norm(text).to(h.dtype)), 0.2)[:, :, None, None].expand(-1, -1, *h.shape[2:])
        return self.head(self.joint(torch.cat([h, t], dim=1))).flatten()


class TextProjectionDiscriminator(nn.Module):
    """(image, sentence embedding) -> head(h) + <MLP(text), sum-pooled h> (Miyato & Koyama's
    projection, with the class embedding replaced by a learned map of the sentence)."""

    def __init__(self, model: ModelConfig, data: DataConfig):
        super().__init__()
        self.trunk, self.head, width = _dcgan_trunk(model, data.channels, data.image_size)
        self.text_norm = text_standardizer(embedding_dim(data.text_encoder), model.text_norm)
        self.text = nn.Sequential(nn.Linear(embedding_dim(data.text_encoder), 2 * model.cond_dim), nn.LeakyReLU(0.2, True),
                                  nn.Linear(2 * model.cond_dim, width))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return self.head(h).flatten() + (self.text(self.text_norm(text).to(h.dtype)) * h.sum(dim=(2, 3))).sum(dim=1)


register(GENERATORS, "dcgan_label")(LabelGenerator)
register(DISCRIMINATORS, "projection")(ProjectionDiscriminator)
register(DISCRIMINATORS, "concat")(ConcatDiscriminator)
register(GENERATORS, "dcgan_text")(TextGenerator)
register(DISCRIMINATORS, "matching")(MatchingDiscriminator)
register(DISCRIMINATORS, "text_projection")(TextProjectionDiscriminator)
