"""The small CNN behind gannet's offline evaluation features: a digit classifier for noise GANs
(gannet.trainer.evaluation.evaluate), a domain classifier for translation GANs (gannet.trainer.evaluation.translation)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gannet.trainer.config.schema import Config


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
    """Seeded with 0 on a forked RNG: the same classifier every time, and the caller's random streams
    (a training run's, when it evaluates as it trains) stay where they were."""
    with torch.random.fork_rng(devices=[]):
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


def cached_classifier(cfg: Config, train: tuple[torch.Tensor, torch.Tensor], heldout: tuple[torch.Tensor, torch.Tensor],
                      cache: Path, what: str) -> tuple[DigitClassifier, float]:
    """The classifier cached at `cache` (beside the shards), else trained on `train` (images, labels)
    and saved; returns it and its accuracy on `heldout`. `what` names it in the log."""
    meta = cache.with_suffix(".json")
    if cache.exists() and meta.exists():
        with torch.device("meta"):  # no initial weights to draw: the cached ones replace them
            model = DigitClassifier(cfg.data.channels, cfg.data.image_size)
        model.load_state_dict(load_file(str(cache)), assign=True)
        return model.eval(), json.loads(meta.read_text())["heldout_accuracy"]
    logging.getLogger("gannet").info("training the %s on %d real images (cached in %s)", what, len(train[0]), cache)
    model = train_classifier(*train, cfg)
    with torch.no_grad():
        accuracy = (model(heldout[0]).argmax(1) == heldout[1]).float().mean().item()
    save_file(model.state_dict(), str(cache))
    meta.write_text(json.dumps({"heldout_accuracy": accuracy}))
    return model, accuracy
