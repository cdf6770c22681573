"""Network registry and the DCGAN generator/discriminator.

Networks are small modules registered by name, so a config picks them (`model.generator: dcgan`)
and a new architecture is one decorated class. Builders take the model and data config sections
and nothing else.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from gannet.trainer.config.schema import DataConfig, ModelConfig
from gannet.trainer.errors import ConfigError

Builder = Callable[[ModelConfig, DataConfig], nn.Module]
GENERATORS: dict[str, Builder] = {}
DISCRIMINATORS: dict[str, Builder] = {}


def register(table: dict[str, Builder], name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        table[name] = builder
        return builder

    return add


def build(table: dict[str, Builder], name: str, model: ModelConfig, data: DataConfig) -> nn.Module:
    """A registered network; spectrally normalised where `model.spectral_norm` says (D: "d" or
    "both"; G: "both"), whichever architecture it is."""
    if name not in table:
        kind = "model.generator" if table is GENERATORS else "model.discriminator"
        raise ConfigError(f"{kind}={name!r} is not registered (choose one of: {', '.join(sorted(table))})")
    net = table[name](model, data)
    if model.spectral_norm == "both" or (model.spectral_norm == "d" and table is DISCRIMINATORS):
        spectral_normalize(net)
    return net


def d_batch_norm(model: ModelConfig) -> bool:
    """Whether D gets BatchNorm layers: `model.d_norm`, or `model.norm` where it is unset."""
    return (model.d_norm or model.norm) == "batch"


def spectral_normalize(net: nn.Module) -> nn.Module:
    """Divide every conv, linear and embedding weight by its largest singular value (Miyato et al.
    2018), estimated by one power iteration per training forward. The iteration's vectors u and v
    are buffers (`...parametrizations.weight.0._u` / `._v`), so state dicts and checkpoints carry
    them and a resumed run continues the same estimate; in eval mode no iteration runs.

    A network may name children in `spectral_norm_exempt`: layers that see only the condition
    (a caption's embedding) do not enter D's Lipschitz constant in the image, and normalising
    them only shrinks the small differences between captions until D cannot tell them apart."""
    from torch.nn.utils.parametrizations import spectral_norm

    layers = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)
    exempt = {id(m) for name in getattr(net, "spectral_norm_exempt", ()) for m in getattr(net, name).modules()}
    for module in list(net.modules()):
        if isinstance(module, layers) and id(module) not in exempt:
            spectral_norm(module)  # ConvTranspose2d: normalised over its output dim (torch picks dim=1)
    return net


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's init: conv weights N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def dcgan_plan(image_size: int) -> tuple[int, int]:
    """(base resolution, number of 2x stages): 28 -> (7, 2), 32 -> (4, 3), 64 -> (4, 4).

    DCGAN grows a 4x4 (or 7x7 for MNIST's 28 px) map by fractionally-strided convolutions that
    each double the side, so the side must be base * 2**n.
    """
    for base in (4, 7):
        stages = math.log2(image_size / base)
        if stages >= 1 and stages == int(stages):
            return base, int(stages)
    raise ConfigError(f"data.image_size={image_size} does not fit DCGAN (use 4 or 7 times a power of two: 28, 32, 64, 128)")


def norm_layer(channels: int, batch_norm: bool) -> list[nn.Module]:
    """BatchNorm where DCGAN puts it; `model.norm=none` drops it (and the convs get biases back)."""
    return [nn.BatchNorm2d(channels)] if batch_norm else []


class DCGANGenerator(nn.Module):
    """z -> image, following the DCGAN guidelines (Radford et al. 2016).

    A transposed conv projects z to base x base, then each stage doubles the side and halves the
    channels; BatchNorm + ReLU everywhere except the output, which is Tanh (images in [-1, 1]).
    No pooling and no fully connected hidden layers.
    """

    def __init__(self, z_dim: int, width: int, channels: int, image_size: int, batch_norm: bool = True):
        super().__init__()
        base, stages = dcgan_plan(image_size)
        chans = [width * 2 ** (stages - 1 - i) for i in range(stages)]  # e.g. 256, 128, 64
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, chans[0], base, 1, 0, bias=not batch_norm),
            *norm_layer(chans[0], batch_norm),
            nn.ReLU(True),
        ]
        for c_in, c_out in zip(chans, chans[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=not batch_norm), *norm_layer(c_out, batch_norm), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(chans[-1], channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.z_dim = z_dim
        self.apply(dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.z_dim, 1, 1))


class DCGANDiscriminator(nn.Module):
    """image -> one logit per image: the generator mirrored.

    Strided convs halve the side and double the channels; LeakyReLU(0.2) throughout; BatchNorm on
    every layer but the input layer (and the output conv, which reduces base x base to 1 x 1).
    """

    def __init__(self, width: int, channels: int, image_size: int, batch_norm: bool = True):
        super().__init__()
        base, stages = dcgan_plan(image_size)
        chans = [width * 2**i for i in range(stages)]  # e.g. 64, 128, 256
        layers: list[nn.Module] = [nn.Conv2d(channels, chans[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for c_in, c_out in zip(chans, chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=not batch_norm), *norm_layer(c_out, batch_norm), nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(chans[-1], 1, base, 1, 0, bias=False)]
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


@register(GENERATORS, "dcgan")
def _dcgan_g(model: ModelConfig, data: DataConfig) -> nn.Module:
    return DCGANGenerator(model.z_dim, model.g_width, data.channels, data.image_size, model.norm == "batch")


@register(DISCRIMINATORS, "dcgan")
def _dcgan_d(model: ModelConfig, data: DataConfig) -> nn.Module:
    return DCGANDiscriminator(model.d_width, data.channels, data.image_size, d_batch_norm(model))


class SNGANGenerator(nn.Module):
    """SNGAN's "standard CNN" generator (Miyato et al. 2018, table 3), on DCGAN's plan: a linear
    layer to base x base x (width * 2**stages), stages of 4x4 stride-2 transposed convs with
    BatchNorm + ReLU, and a 3x3 conv + Tanh at full size, so the last layer mixes a neighbourhood
    instead of painting each pixel from one 2x2 patch as DCGAN's last transposed conv does."""

    def __init__(self, z_dim: int, width: int, channels: int, image_size: int, batch_norm: bool = True):
        super().__init__()
        base, stages = dcgan_plan(image_size)
        chans = [width * 2 ** (stages - i) for i in range(stages + 1)]  # e.g. 256, 128, 64
        self.base, self.top = base, chans[0]
        self.fc = nn.Linear(z_dim, base * base * chans[0])
        layers: list[nn.Module] = [*norm_layer(chans[0], batch_norm), nn.ReLU(True)]
        for c_in, c_out in zip(chans, chans[1:]):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=not batch_norm), *norm_layer(c_out, batch_norm), nn.ReLU(True)]
        layers += [nn.Conv2d(chans[-1], channels, 3, 1, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z.flatten(1)).view(z.shape[0], self.top, self.base, self.base))


class SNGANDiscriminator(nn.Module):
    """SNGAN's "standard CNN" discriminator: per stage a 3x3 stride-1 conv then a 4x4 stride-2
    conv, channels doubling per stage, a last 3x3 conv and a linear head; LeakyReLU(0.1). Twice
    the layers of DCGAN's D at the same width, which spectral norm needs: it caps each layer's
    gain, so depth, not scale, is what lets D draw a sharp boundary."""

    def __init__(self, width: int, channels: int, image_size: int, batch_norm: bool = False):
        super().__init__()
        base, stages = dcgan_plan(image_size)
        layers: list[nn.Module] = []
        c_in = channels
        for i in range(stages):
            c = width * 2**i
            layers += [nn.Conv2d(c_in, c, 3, 1, 1), nn.LeakyReLU(0.1, True),
                       nn.Conv2d(c, c, 4, 2, 1, bias=not batch_norm), *norm_layer(c, batch_norm), nn.LeakyReLU(0.1, True)]
            c_in = c
        top = width * 2**stages
        layers += [nn.Conv2d(c_in, top, 3, 1, 1), nn.LeakyReLU(0.1, True), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.head = nn.Linear(top * base * base, 1)
        self.apply(dcgan_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x)).flatten()


@register(GENERATORS, "sngan")
def _sngan_g(model: ModelConfig, data: DataConfig) -> nn.Module:
    return SNGANGenerator(model.z_dim, model.g_width, data.channels, data.image_size, model.norm == "batch")


@register(DISCRIMINATORS, "sngan")
def _sngan_d(model: ModelConfig, data: DataConfig) -> nn.Module:
    return SNGANDiscriminator(model.d_width, data.channels, data.image_size, d_batch_norm(model))


# -- CycleGAN (Zhu et al. 2017) and its public PyTorch reference (junyanz/pytorch-CycleGAN-and-pix2pix) --


def cyclegan_init(module: nn.Module) -> None:
    """The reference's `init_weights(init_type='normal', gain=0.02)`: conv weights N(0, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        nn.init.zeros_(module.bias)


def instance_norm(channels: int) -> nn.Module:
    """Instance norm as the reference uses it: no affine parameters and no running statistics, so
    train and eval mode normalise the same way and there are no buffers to sync across ranks. With
    no affine shift the convolutions before it keep their biases (the reference's use_bias=True)."""
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


class ResidualBlock(nn.Module):
    """x + (reflect-pad, conv3, IN, ReLU, reflect-pad, conv3, IN)(x): the reference's ResnetBlock."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), instance_norm(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), instance_norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """image -> image: c7s1-ngf, d(2ngf), d(4ngf), `blocks` x R(4ngf), u(2ngf), u(ngf), c7s1-C + Tanh.

    Two stride-2 convs bring the side down by 4, the residual blocks work at that resolution, and
    two fractionally-strided convs (output_padding=1, so the side exactly doubles) bring it back.
    Reflection padding at the borders avoids the dark frames zero padding leaves in translations.
    """

    def __init__(self, channels: int, width: int = 64, blocks: int = 9):
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(channels, width, 7), instance_norm(width), nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.Conv2d(width * mult, width * mult * 2, 3, 2, 1), instance_norm(width * mult * 2), nn.ReLU(True)]
        layers += [ResidualBlock(width * 4) for _ in range(blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(width * mult, width * mult // 2, 3, 2, 1, output_padding=1),
                       instance_norm(width * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, channels, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(cyclegan_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """image -> a map of real/fake scores, one per 70x70 patch (the reference's NLayerDiscriminator, n_layers=3).

    Three 4x4 stride-2 convs (ndf, 2ndf, 4ndf), one 4x4 stride-1 conv (8ndf) and a 4x4 stride-1 conv
    to one channel; LeakyReLU 0.2; instance norm on all but the first layer. Each output sees a
    70x70 receptive field, so D judges local texture (stripes) and works at any image size.
    """

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for c_in, c_out, stride in ((1, 2, 2), (2, 4, 2), (4, 8, 1)):
            layers += [nn.Conv2d(width * c_in, width * c_out, 4, stride, 1), instance_norm(width * c_out),
                       nn.LeakyReLU(0.2, True)]
        layers += [nn.Conv2d(width * 8, 1, 4, 1, 1)]
        self.net = nn.Sequential(*layers)
        self.apply(cyclegan_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def resnet_blocks(image_size: int) -> int:
    """The paper's choice: 6 residual blocks for 128 px (and smaller) images, 9 for 256 px and up."""
    return 9 if image_size >= 256 else 6


@register(GENERATORS, "resnet")
def _resnet_g(model: ModelConfig, data: DataConfig) -> nn.Module:
    return ResnetGenerator(data.channels, model.g_width, resnet_blocks(data.image_size))


@register(DISCRIMINATORS, "patchgan")
def _patch_d(model: ModelConfig, data: DataConfig) -> nn.Module:
    return PatchDiscriminator(data.channels, model.d_width)
