"""R3GAN's networks (Huang, Gokaslan, Kuleshov, Tompkin, "The GAN is dead; long live the GAN! A
Modern GAN Baseline", NeurIPS 2024): a plain modern ConvNet for G and D, as the authors' code
(brownvc/R3GAN, R3GAN/Networks.py) builds it.

- Stages from a 4x4 basis up to `data.image_size` (one per doubling), each with its own width,
  number of residual blocks and cardinality (`model.widths`, `blocks`, `cardinality`, in G's
  order; D is the mirror image).
- A residual block is ConvNeXt-like without its normalisation: 1x1 expand (x `model.expansion`),
  biased leaky ReLU, grouped 3x3 (`cardinality` groups), biased leaky ReLU, 1x1 project, added to
  its input. No normalisation anywhere, so nothing couples the samples of a batch.
- Fix-up initialisation: weights N(0, gain / sqrt(fan-in)) with the leaky ReLU's gain scaled by
  L^(-1/4) (L = all blocks of the network), and each block's last layer at zero, so every block
  starts as the identity and the variance of the signal does not grow with depth.
- Resampling by a fixed low-pass filter ([1, 3, 3, 1] in each direction, from the binomial
  [1, 2, 1]), one channel at a time, computed as bilinear interpolation up and average pools down.
- G starts from a learned 4x4 basis scaled per channel by a linear map of z; D ends with a
  depthwise 4x4 convolution and a linear layer. Class-conditional (`r3gan_cond`): a class
  embedding is concatenated to z, and D's last layer gives a vector projected on a class
  embedding (Miyato & Koyama's projection).
G's output is not squashed (no tanh), as in the paper; sampling clamps to [-1, 1]. `model.g_output=tanh`
squashes it, for data whose pixels sit at the ends of the range: on MNIST an unbounded G must land
exactly on -1 for the background, which a tanh reaches by saturating (FID 137 against 432 at step
500, docs/results.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gannet.models.networks import DISCRIMINATORS, GENERATORS, register
from gannet.trainer.config.schema import DataConfig, ModelConfig
from gannet.trainer.errors import ConfigError

SLOPE = 0.2
GAIN = math.sqrt(2 / (1 + SLOPE**2))  # the leaky ReLU's gain: keeps the signal's variance through it
GROUP_CHANNELS = 16  # expanded channels per group in every official preset (1536/96, 768/48, ...)


def msr_init(layer: nn.Module, gain: float = 1.0) -> nn.Module:
    """He-style init with a gain: weights N(0, gain / sqrt(fan-in)), biases zero."""
    fan_in = layer.weight[0].numel() if isinstance(layer, nn.Conv2d) else layer.weight.shape[1]
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(fan_in))
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


def conv(c_in: int, c_out: int, kernel: int, groups: int = 1, gain: float = 1.0) -> nn.Conv2d:
    return msr_init(nn.Conv2d(c_in, c_out, kernel, padding=(kernel - 1) // 2, groups=groups, bias=False), gain)


class BiasedActivation(nn.Module):
    """A learned bias per channel, then leaky ReLU 0.2 (the official fused bias_act, in plain torch)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.to(x.dtype).view(1, -1, 1, 1), SLOPE)


class ResidualBlock(nn.Module):
    """x + project(act(grouped 3x3(act(expand(x))))), the projection initialised at zero."""

    def __init__(self, channels: int, cardinality: int, expansion: int, depth: int):
        super().__init__()
        wide = channels * expansion
        gain = GAIN * depth ** (-1 / 4)  # fix-up: L^(-1/(2m - 2)) for m = 3 layers per block
        self.expand = conv(channels, wide, 1, gain=gain)
        self.act1 = BiasedActivation(wide)
        self.grouped = conv(wide, wide, 3, groups=cardinality, gain=gain)
        self.act2 = BiasedActivation(wide)
        self.project = conv(wide, channels, 1, gain=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.act2(self.grouped(self.act1(self.expand(x)))))


def lowpass_kernel() -> torch.Tensor:
    """The 4x4 resampling filter: [1, 2, 1] convolved with [1, 1] = [1, 3, 3, 1], outer product, sum 1."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = torch.outer(taps, taps)
    return kernel / kernel.sum()


def upsample(x: torch.Tensor) -> torch.Tensor:
    """2x up through the filter with zero borders (the official upfirdn2d: zeros inserted, then the
    filter x 4). In each direction that is 3/4 of the nearest pixel plus 1/4 of the next, which is
    bilinear interpolation; padding with zeros first and cropping after makes the borders match
    too. Computed this way it is several times faster on CPUs than a per-channel transposed conv."""
    y = F.interpolate(F.pad(x, [1, 1, 1, 1]), scale_factor=2, mode="bilinear", align_corners=False)
    return y[:, :, 2:-2, 2:-2]


def downsample(x: torch.Tensor) -> torch.Tensor:
    """2x down through the filter with zero borders (a stride-2 conv with it): [1, 3, 3, 1] / 8 is
    three box filters of width 2 in a row, the last at stride 2: three 2x2 average pools, the
    fastest form eagerly on CPUs. Under torch.compile the same filter is taken as strided slices:
    inductor (torch 2.13) fails to compile the backward of a stride-2 pool after a stride-1 one
    ("vr must not be None for symbol q2") and compiles the slices."""
    if torch.compiler.is_compiling():
        return _downsample_by_slices(x)
    y = F.avg_pool2d(F.avg_pool2d(F.pad(x, [1, 1, 1, 1]), 2, 1), 2, 1)
    return F.avg_pool2d(y, 2, 2)


def _downsample_by_slices(x: torch.Tensor) -> torch.Tensor:
    """`downsample` as taps: output i weighs padded inputs 2i .. 2i+3 by 1, 3, 3, 1 in each direction."""
    p = F.pad(x, [1, 1, 1, 1])
    h = p[:, :, 0:-2:2] + 3 * p[:, :, 1:-1:2] + 3 * p[:, :, 2::2] + p[:, :, 3::2]
    return (h[..., 0:-2:2] + 3 * h[..., 1:-1:2] + 3 * h[..., 2::2] + h[..., 3::2]) / 64


class Resample(nn.Module):
    """2x up or down by the fixed low-pass filter, each channel on its own; a 1x1 conv changes the
    width (before upsampling, after downsampling: on the smaller map)."""

    def __init__(self, c_in: int, c_out: int, up: bool):
        super().__init__()
        self.up = up
        self.linear = conv(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return upsample(self.linear(x))
        return self.linear(downsample(x))


class GenerativeBasis(nn.Module):
    """z (with its class embedding) -> a learned 4x4 basis per channel, scaled by a linear map of z."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.basis = nn.Parameter(torch.randn(c_out, 4, 4))
        self.linear = msr_init(nn.Linear(c_in, c_out, bias=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.basis[None] * self.linear(z)[:, :, None, None]


class DiscriminativeBasis(nn.Module):
    """4x4 features -> a vector: a depthwise 4x4 convolution (one weight map per channel), then linear."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.basis = msr_init(nn.Conv2d(c_in, c_in, 4, groups=c_in, bias=False))
        self.linear = msr_init(nn.Linear(c_in, c_out, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.basis(x).flatten(1))


class Plan:
    """Per-stage widths, blocks and cardinality for one image size, checked against the config.
    `discriminator`: D's plan, from `model.d_widths` where set (the official code always mirrors
    G's; sizing the two apart is how a bottleneck in one of them is found), else the same as G's."""

    def __init__(self, model: ModelConfig, data: DataConfig, discriminator: bool = False):
        stages = math.log2(data.image_size / 4) + 1
        if not (stages == int(stages) and 2 <= stages <= 9):
            raise ConfigError(f"data.image_size={data.image_size} does not fit R3GAN's networks (a power of two from 8 to 1024)")
        n = int(stages)
        own = discriminator and bool(model.d_widths)
        self.widths = list(model.d_widths if own else model.widths)
        self.blocks = list(model.blocks) or [2] * n  # every official preset: 2 blocks per stage
        self.cardinality = list(model.cardinality) or [w * model.expansion // GROUP_CHANNELS for w in self.widths]
        for key, values in (("d_widths" if own else "widths", self.widths), ("blocks", self.blocks), ("cardinality", self.cardinality)):
            if len(values) != n:
                raise ConfigError(f"model.{key} needs {n} values for data.image_size={data.image_size} "
                                  f"(one per stage: 4x4 up to {data.image_size}x{data.image_size}); got {values}")
        if min(self.widths) < 1 or min(self.blocks) < 0 or model.expansion < 1:
            raise ConfigError(f"model.{'d_widths' if own else 'widths'}={self.widths} must be >= 1, blocks={self.blocks} >= 0, expansion={model.expansion} >= 1")
        for width, groups in zip(self.widths, self.cardinality):
            if groups < 1 or (width * model.expansion) % groups:
                raise ConfigError(f"model.cardinality={self.cardinality}: each must divide its stage's width x expansion "
                                  f"({width} x {model.expansion})")
        self.expansion, self.depth = model.expansion, max(sum(self.blocks), 1)

    def stage_blocks(self, i: int) -> list[nn.Module]:
        return [ResidualBlock(self.widths[i], self.cardinality[i], self.expansion, self.depth) for _ in range(self.blocks[i])]


def _classes(model: ModelConfig) -> int:
    if model.num_classes < 2:
        raise ConfigError(f"model.num_classes={model.num_classes} must be >= 2 for a class-conditional R3GAN")
    return model.num_classes


class R3GANGenerator(nn.Module):
    """z (+ class) -> image: basis at 4x4, then per stage [upsample] + residual blocks, then a 1x1 to pixels."""

    def __init__(self, model: ModelConfig, data: DataConfig, conditional: bool = False):
        super().__init__()
        plan = Plan(model, data)
        self.embed = None
        if conditional:  # the official Linear on one-hot labels, as a lookup: same weights, same count
            self.embed = nn.Embedding(_classes(model), model.cond_dim)
            nn.init.normal_(self.embed.weight, 0.0, 1 / math.sqrt(model.num_classes))
        width = plan.widths
        stages = [nn.Sequential(GenerativeBasis(model.z_dim + (model.cond_dim if conditional else 0), width[0]), *plan.stage_blocks(0))]
        stages += [nn.Sequential(Resample(width[i - 1], width[i], up=True), *plan.stage_blocks(i)) for i in range(1, len(width))]
        self.stages = nn.Sequential(*stages)
        self.to_image = conv(width[-1], data.channels, 1)
        self.squash = model.g_output == "tanh"

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(label).to(z.dtype)], dim=1)
        image = self.to_image(self.stages(z))
        return torch.tanh(image) if self.squash else image


class R3GANDiscriminator(nn.Module):
    """image (+ class) -> one logit: a 1x1 from pixels, per stage residual blocks + [downsample],
    the 4x4 basis; conditional: <basis output, class embedding>."""

    def __init__(self, model: ModelConfig, data: DataConfig, conditional: bool = False):
        super().__init__()
        plan = Plan(model, data, discriminator=True)
        width = plan.widths
        self.from_image = conv(data.channels, width[-1], 1)
        last = len(width) - 1
        stages = [nn.Sequential(*plan.stage_blocks(i), Resample(width[i], width[i - 1], up=False)) for i in range(last, 0, -1)]
        out = width[0] if conditional else 1
        self.stages = nn.Sequential(*stages, nn.Sequential(*plan.stage_blocks(0), DiscriminativeBasis(width[0], out)))
        self.embed = None
        if conditional:  # unit-variance projection: embedding weights N(0, 1 / (classes x width))
            self.embed = nn.Embedding(_classes(model), width[0])
            nn.init.normal_(self.embed.weight, 0.0, 1 / math.sqrt(model.num_classes * width[0]))

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        h = self.stages(self.from_image(x))
        if self.embed is not None:
            h = (h * self.embed(label).to(h.dtype)).sum(dim=1, keepdim=True)
        return h.flatten()


class R3GANCondGenerator(R3GANGenerator):
    """G(z, class): the class embedding (`model.cond_dim` wide) concatenated to z."""

    def __init__(self, model: ModelConfig, data: DataConfig):
        super().__init__(model, data, conditional=True)


class R3GANCondDiscriminator(R3GANDiscriminator):
    """D(x, class): the basis gives a `widths[0]`-vector, projected on the class's embedding."""

    def __init__(self, model: ModelConfig, data: DataConfig):
        super().__init__(model, data, conditional=True)


@register(GENERATORS, "r3gan")
def _r3gan_g(model: ModelConfig, data: DataConfig) -> nn.Module:
    return R3GANGenerator(model, data)


@register(DISCRIMINATORS, "r3gan")
def _r3gan_d(model: ModelConfig, data: DataConfig) -> nn.Module:
    return R3GANDiscriminator(model, data)


register(GENERATORS, "r3gan_cond")(R3GANCondGenerator)
register(DISCRIMINATORS, "r3gan_cond")(R3GANCondDiscriminator)
