"""GAN recipes: the losses are the papers' and Algorithm 1's update order holds on the real engine."""

from __future__ import annotations

import math

import pytest
import torch

from gannet.models.recipes import make_recipe
from gannet.trainer.config.loader import load_config
from gannet.trainer.data.stream import DataStream, expand_urls
from gannet.trainer.engine.setup import setup
from tests.conftest import tiny_overrides


def recipe_for(overrides: list[str], config: str = "gan_mnist"):
    cfg = load_config(config, overrides)
    return make_recipe(cfg), cfg


def test_gan_losses():
    gan, _ = recipe_for([])
    zero = torch.zeros(8)
    assert gan.d_loss(zero, zero).item() == pytest.approx(math.log(2))  # D = 1/2 everywhere: equilibrium
    logits = torch.tensor([-3.0, 0.0, 2.0])
    p = torch.sigmoid(logits)
    assert gan.g_loss(logits).item() == pytest.approx(-torch.log(p).mean().item(), rel=1e-6)  # non-saturating
    minimax, _ = recipe_for(["recipe.loss=minimax"])
    assert minimax.g_loss(logits).item() == pytest.approx(torch.log(1 - p).mean().item(), rel=1e-6)


def test_minimax_generator_gradient_saturates_where_nonsaturating_does_not():
    """Early in training D rejects fakes (D(G(z)) ~ 0): the reason the paper suggests the non-saturating loss."""
    grads = {}
    for loss in ("minimax", "nonsaturating"):
        recipe, _ = recipe_for([f"recipe.loss={loss}"])
        logit = torch.tensor([-6.0], requires_grad=True)
        recipe.g_loss(logit).backward()
        grads[loss] = logit.grad.abs().item()
    assert grads["minimax"] < 0.01 < 0.9 < grads["nonsaturating"]


def test_lsgan_losses_use_the_configured_targets():
    lsgan, _ = recipe_for(["recipe.a=-1", "recipe.b=1", "recipe.c=0"], "lsgan_mnist")
    real, fake = torch.tensor([1.0, 1.0]), torch.tensor([-1.0, -1.0])
    assert lsgan.d_loss(real, fake).item() == 0.0  # D hits its targets exactly
    assert lsgan.g_loss(torch.tensor([2.0])).item() == pytest.approx(0.5 * 4.0)


@pytest.mark.parametrize("name", ["gan", "lsgan"])
def test_iteration_runs_k_d_steps_then_one_g_step_through_a_frozen_d(small_shards, tmp_path, name):
    cfg = load_config(f"{name}_mnist", tiny_overrides(small_shards, tmp_path, **{"recipe.d_steps": 3}))
    job = setup(cfg)
    engine, recipe = job.engine, job.recipe
    engine.data = DataStream(expand_urls(cfg.data.shards), cfg.data, rank=0, world=1, seed=0)
    snapshot = lambda net: [p.detach().clone() for p in net.parameters()]  # noqa: E731
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b))  # noqa: E731
    g_before, events = snapshot(engine.nets["G"]), []

    def after_d_step(*_):
        events.append("D")
        assert same(snapshot(engine.nets["G"]), g_before), "a D step changed G"
        after_d_step.d_params = snapshot(engine.nets["D"])

    def after_g_step(*_):
        events.append("G")
        assert same(snapshot(engine.nets["D"]), after_d_step.d_params), "the G step changed D"
        # no gradient leaked into D during the G step (it would be added to D's next update)
        assert all(p.grad is None for p in engine.nets["D"].parameters())

    engine.optimizers["D"].optimizer.register_step_post_hook(after_d_step)
    engine.optimizers["G"].optimizer.register_step_post_hook(after_g_step)
    metrics = recipe.iteration(engine)
    assert events == ["D", "D", "D", "G"]
    assert engine.data.position.consumed[0] == 3 * cfg.data.batch_size  # a fresh real batch per D step
    assert not same(snapshot(engine.nets["G"]), g_before)
    assert all(p.requires_grad for p in engine.nets["D"].parameters())  # unfrozen after the G step
    assert set(metrics) == {"loss_d", "loss_g", "d_real", "d_fake", "d_real_outputs", "d_fake_outputs", "d_scale"}
    assert metrics["d_real_outputs"].shape == metrics["d_fake_outputs"].shape == (cfg.data.batch_size,)  # histograms
    assert all(torch.isfinite(v).all() for v in metrics.values())
