"""DCGAN and SNGAN networks: output shapes per size, the DCGAN guidelines, SNGAN's layer
plan, and the reference parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gannet.models.networks import DCGANDiscriminator, DCGANGenerator, SNGANDiscriminator, SNGANGenerator


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("arch", [(DCGANGenerator, DCGANDiscriminator), (SNGANGenerator, SNGANDiscriminator)])
def test_shapes_and_output_range(size, arch):
    G, D = arch[0](100, 16, 3, size), arch[1](16, 3, size)
    images = G(torch.randn(5, 100))
    assert images.shape == (5, 3, size, size)
    assert images.abs().max() <= 1.0  # Tanh output: the same range as the data
    assert D(images).shape == (5,)


def test_dcgan_guidelines_hold():
    G, D = DCGANGenerator(100, 64, 1, 64), DCGANDiscriminator(64, 1, 64)
    for net in (G, D):
        kinds = {type(m) for m in net.modules()}
        assert not kinds & {nn.Linear, nn.MaxPool2d, nn.AvgPool2d}  # strided convs, no FC hidden layers
    g_layers = list(G.net)
    assert isinstance(g_layers[-1], nn.Tanh) and isinstance(g_layers[-2], nn.ConvTranspose2d)  # no BN on G's output
    assert all(isinstance(m, nn.ReLU) for m in g_layers if isinstance(m, (nn.ReLU, nn.LeakyReLU)))
    d_layers = list(D.net)
    assert isinstance(d_layers[0], nn.Conv2d) and isinstance(d_layers[1], nn.LeakyReLU)  # no BN on D's input layer
    assert all(m.negative_slope == 0.2 for m in d_layers if isinstance(m, nn.LeakyReLU))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g_layers) == 4
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d_layers) == 3


def test_parameter_counts_match_the_pytorch_dcgan_reference():
    # The 64 px, 3-channel networks of the PyTorch DCGAN example (nz=100, ngf=ndf=64):
    # G = 100*512*16 + 512*256*16 + 256*128*16 + 128*64*16 + 64*3*16 + 2*(512+256+128+64) = 3,576,704
    # D = 3*64*16 + 64*128*16 + 128*256*16 + 256*512*16 + 512*16 + 2*(128+256+512) = 2,765,568
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(DCGANGenerator(100, 64, 3, 64)) == 3_576_704
    assert count(DCGANDiscriminator(64, 3, 64)) == 2_765_568


def test_sngan_standard_cnn_layer_plan():
    """Miyato et al. 2018, table 3, at 28 px (base 7, two stages): G is linear -> 7x7x(4w), two 4x4
    stride-2 transposed convs, a 3x3 conv and Tanh; D is, per stage, a 3x3 stride-1 then a 4x4
    stride-2 conv, a last 3x3 conv, LeakyReLU(0.1) and a linear head, without BatchNorm, so each
    image's logit does not depend on the rest of its batch."""
    w = 32
    G, D = SNGANGenerator(100, w, 1, 28), SNGANDiscriminator(w, 1, 28)
    assert G.fc.out_features == 7 * 7 * 4 * w
    convs = [m for m in G.net if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d))]
    assert [(type(m), m.kernel_size, m.stride, m.out_channels) for m in convs] == [
        (nn.ConvTranspose2d, (4, 4), (2, 2), 2 * w), (nn.ConvTranspose2d, (4, 4), (2, 2), w), (nn.Conv2d, (3, 3), (1, 1), 1)]
    d_convs = [(m.kernel_size[0], m.stride[0], m.out_channels) for m in D.net if isinstance(m, nn.Conv2d)]
    assert d_convs == [(3, 1, w), (4, 2, w), (3, 1, 2 * w), (4, 2, 2 * w), (3, 1, 4 * w)]
    assert all(m.negative_slope == 0.1 for m in D.net if isinstance(m, nn.LeakyReLU))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())
    x = torch.randn(6, 1, 28, 28)
    assert torch.allclose(D(x)[:2], D(x[:2]), atol=1e-5)
