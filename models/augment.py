"""Differentiable augmentation of D's inputs: DiffAugment (Zhao et al. 2020) and ADA (Karras et
al. 2020), in plain torch.

D sees T(x) for real images and T(G(z)) for fakes, in its own step and in G's step alike, with T
drawn afresh per image from the same distribution; T is differentiable, so G learns through it.
On a few thousand images D otherwise memorises the training set and its gradients stop being
useful to G. Images are in [-1, 1]; the ops follow the DiffAugment policy names:

- `color`: brightness (+U(-0.5, 0.5)), saturation (x U(0, 2) around the channel mean), contrast
  (x U(0.5, 1.5) around the image mean);
- `translation`: integer shifts up to 1/8 of the side, zero-filled;
- `cutout`: a zeroed square of half the side at a random place.

ADA applies each op to an image only with probability p (and adds x-flips and 90-degree
rotations, which it only leaks into G's samples when p nears 1), and tunes p during training: the
fraction of real images D scores on the real side of its decision boundary, r_t = E[sign(D(x))],
is held near a target (0.6): above it D is overfitting and p rises, below it p falls.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Op = Callable[[torch.Tensor], torch.Tensor]


def _uniform(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype) * (high - low) + low


def brightness(x: torch.Tensor) -> torch.Tensor:
    return x + _uniform(x, -0.5, 0.5)


def saturation(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * _uniform(x, 0.0, 2.0) + mean


def contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _uniform(x, 0.5, 1.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by whole pixels (up to ratio * side each way), filling with zeros."""
    n, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sy, sy + 1, (n, 1), device=x.device)
    tx = torch.randint(-sx, sx + 1, (n, 1), device=x.device)
    rows = torch.arange(h, device=x.device)[None] + sy - ty  # (n, h): source row in the padded image
    cols = torch.arange(w, device=x.device)[None] + sx - tx
    padded = F.pad(x, [sx, sx, sy, sy])
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero a square of ratio * side at a random centre of each image."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = ((ys - cy + ch // 2) >= 0) & ((ys - cy + ch // 2) < ch) & ((xs - cx + cw // 2) >= 0) & ((xs - cx + cw // 2) < cw)
    return x * (~inside).to(x.dtype)[:, None]


def xflip(x: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x)


def rotate90(x: torch.Tensor) -> torch.Tensor:
    turns = torch.randint(0, 4, (x.shape[0],), device=x.device)
    out = x
    for k in (1, 2, 3):
        out = torch.where((turns == k)[:, None, None, None], x.rot90(k, dims=(2, 3)), out)
    return out


POLICIES: dict[str, list[Op]] = {
    "color": [brightness, saturation, contrast],
    "translation": [translation],
    "cutout": [cutout],
}
ADA_OPS: list[Op] = [xflip, rotate90, translation, brightness, contrast, saturation]


def parse_policy(policy: str) -> list[Op]:
    names = [p.strip() for p in policy.split(",") if p.strip()]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment op(s) {unknown}; choose from {sorted(POLICIES)}")
    return [op for name in names for op in POLICIES[name]]


def diff_augment(x: torch.Tensor, ops: list[Op]) -> torch.Tensor:
    """DiffAugment: every op on every image, with parameters drawn per image."""
    for op in ops:
        x = op(x)
    return x


def ada_augment(x: torch.Tensor, p: float) -> torch.Tensor:
    """ADA: each op applied to each image with probability p (nothing is drawn when p = 0)."""
    if p <= 0:
        return x
    for op in ADA_OPS:
        chosen = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p
        x = torch.where(chosen, op(x), x)
    return x


class AdaController:
    """ADA's p: D's sign on real images is summed over D steps; every `interval` G steps the mean
    over all ranks (`mean`, so every rank moves p the same way) decides whether p moves up or down
    by interval * batch / speed_images (p can go from 0 to 1 in `speed_images` images)."""

    def __init__(self, target: float, interval: int, speed_images: float):
        self.target, self.interval, self.speed = target, interval, speed_images
        self.p, self.signs, self.count, self.steps = 0.0, 0.0, 0.0, 0

    def observe(self, real_out: torch.Tensor, boundary: float) -> None:
        # a NaN output (its step is skipped) counts as on the boundary: the tally, saved, stays finite
        self.signs += torch.sign(real_out.detach().float() - boundary).nan_to_num(0.0).sum().item()
        self.count += real_out.numel()

    def after_step(self, batch_images: int, mean: Callable[[torch.Tensor], torch.Tensor]) -> float | None:
        """Called once per G step; returns r_t when p was adjusted."""
        self.steps += 1
        if self.steps % self.interval:
            return None
        signs, count = mean(torch.tensor([self.signs, self.count], dtype=torch.float64)).tolist()
        r_t = signs / max(count, 1.0)
        step = batch_images * self.interval / self.speed
        self.p = min(max(self.p + (step if r_t > self.target else -step), 0.0), 1.0)
        self.signs, self.count = 0.0, 0.0
        return r_t

    def state_dict(self) -> dict:
        return {"p": self.p, "signs": self.signs, "count": self.count, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.p, self.signs, self.count, self.steps = state["p"], state["signs"], state["count"], state["steps"]
