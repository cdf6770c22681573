"""The small CNN behind gannet's offline evaluation features: a digit classifier for noise GANs
(trainer.evaluate), a domain classifier for translation GANs (trainer.translation_eval)."""

from __future__ import annotations

import torch
from torch import nn

from trainer.schema import Config


class DigitClassifier(nn.Module):
    """A small CNN; its 128-d penultimate layer is the feature space for FID/KID/PR."""

    def __init__(self, channels: int, image_size: int, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (image_size // 4) ** 2, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, cfg: Config, epochs: int = 4) -> DigitClassifier:
    torch.manual_seed(0)
    model = DigitClassifier(cfg.data.channels, cfg.data.image_size)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(images)).split(64):
            loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
