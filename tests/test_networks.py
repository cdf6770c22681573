"""DCGAN networks: output shapes per size, the DCGAN guidelines, and the reference parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.networks import DCGANDiscriminator, DCGANGenerator


@pytest.mark.parametrize("size", [28, 32, 64])
def test_shapes_and_output_range(size):
    G, D = DCGANGenerator(100, 16, 3, size), DCGANDiscriminator(16, 3, size)
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
