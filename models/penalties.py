"""Gradient penalties on the discriminator, each a function of D (as a callable) and its inputs.

- R1 (Mescheder et al. 2018): gamma / 2 * E ||grad_x D(x)||^2 on real images; StyleGAN2 applies it
  lazily, every N-th D step with the weight scaled by N (`LazyCounter`). R2 is the same on fakes
  (R3GAN penalises both: `squared_grad_norms`).
- WGAN-GP (Gulrajani et al. 2017): lambda * E (||grad D(x_hat)|| - 1)^2 on random points x_hat
  between real and fake images.
- MA-GP (DF-GAN, Tao et al. 2022): k * E ||(grad_x D(x, s), grad_s D(x, s))||^p on real images and
  their matching sentence embeddings jointly (k=2, p=6 in the paper), smoothing D around the
  matching pairs.
Each keeps D's outputs attached to the inputs (`create_graph=True`), so the penalty's gradient
reaches D's weights in the backward that follows (double backward).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

Critic = Callable[..., torch.Tensor]


_TWICE: contextvars.ContextVar[bool] = contextvars.ContextVar("differentiated_twice", default=False)


@contextmanager
def double_backward() -> Iterator[None]:
    """Marks the forwards inside as ones a penalty differentiates twice. The engine runs them
    eagerly (a compiled graph cannot be differentiated twice) and in fp32 (bf16 autocast off),
    whether D's input is the leaf itself or an augmented copy of it."""
    token = _TWICE.set(True)
    try:
        yield
    finally:
        _TWICE.reset(token)


def differentiated_twice() -> bool:
    """True inside `double_backward()` (read by gannet.trainer.engine.fast)."""
    return _TWICE.get()


def _grads(D: Critic, inputs: list[torch.Tensor], *rest: torch.Tensor) -> list[torch.Tensor]:
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    with double_backward():
        out = D(*leaves, *rest).float()
    return [g.float() for g in torch.autograd.grad(out.sum(), leaves, create_graph=True)]  # bf16 weights: sums in fp32


def squared_grad_norms(D: Critic, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
    """||grad_x D(x)||^2 per image, in fp32: R1 is its mean over real images, R2 over fakes."""
    (grad,) = _grads(D, [x], *cond)
    return grad.square().flatten(1).sum(1)


def r1(D: Critic, real: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
    """E ||grad_x D(x)||^2 over real images (times gamma / 2 by the caller)."""
    return squared_grad_norms(D, real, *cond).mean()


def wgan_gp(D: Critic, real: torch.Tensor, fake: torch.Tensor, *cond: torch.Tensor,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """E (||grad D(x_hat)|| - 1)^2, x_hat = eps * real + (1 - eps) * fake, eps ~ U(0, 1) per image."""
    eps = torch.rand(real.shape[0], *([1] * (real.ndim - 1)), generator=generator).to(real.device, real.dtype)
    mixed = eps * real.detach() + (1 - eps) * fake.detach()
    (grad,) = _grads(D, [mixed], *cond)
    return (grad.flatten(1).norm(dim=1) - 1).square().mean()


def ma_gp(D: Critic, real: torch.Tensor, text: torch.Tensor, power: float = 6.0) -> torch.Tensor:
    """E ||(grad_x, grad_s) D(x, s)||^power on real images with their own captions (times k)."""
    grad_x, grad_s = _grads(D, [real, text])
    norm = torch.cat([grad_x.flatten(1), grad_s.flatten(1)], dim=1).norm(dim=1)
    return norm.pow(power).mean()


class LazyCounter:
    """Lazy regularisation: True on every `every`-th D step (all micro-batches of that step).
    Its count is recipe state, checkpointed, so a resumed run regularises on the same steps."""

    def __init__(self, every: int, accumulation: int):
        self.every, self.accumulation, self.calls = every, accumulation, 0

    def __call__(self) -> bool:
        due = (self.calls // self.accumulation) % self.every == 0
        self.calls += 1
        return due
