"""The training-quality toolkit (recipe switches shared by every adversarial recipe): generator EMA,
spectral norm, hinge, R1 / WGAN-GP / MA-GP, DiffAugment / ADA. Each piece is checked against its
formula or a plain autograd reference, and the whole set against the engine: exact resume after a
SIGKILL, and 2-process DDP and ZeRO-3 runs that must agree (an EMA of ZeRO-3 shards would not)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from gannet.models import augment, ema, penalties
from gannet.models.networks import spectral_normalize
from gannet.trainer.checkpoint.statefile import load_state
from gannet.trainer.config.loader import load_config
from gannet.trainer.data.stream import open_stream, stream_urls
from gannet.trainer.engine.setup import setup
from gannet.trainer.errors import ConfigError
from gannet.trainer.tracking.tracker import read_metrics as metrics
from tests.conftest import gannet, kill_when, tiny_overrides, without_perf
from tests.test_distributed import assert_same_weights, harness

QUALITY = {"recipe.ema_kimg": 1, "recipe.r1_gamma": 1.0, "recipe.r1_every": 3, "recipe.augment": "diffaugment"}


def small_job(shards, tmp_path, **extra):
    cfg = load_config("lsgan_mnist", tiny_overrides(shards, tmp_path, **extra))
    job = setup(cfg)
    job.engine.data = open_stream(stream_urls(cfg.data), cfg.data, rank=0, world=1, seed=0)
    return job


# -- EMA -------------------------------------------------------------------------------------------

def test_ema_beta_is_stylegan2_adas_formula_with_its_ramp_up():
    """beta = 0.5 ** (batch / min(half_life, ramp x images seen)): the first update copies G, the
    ramp-up lengthens the half-life with what G has seen, and it is capped at `half_life_images`."""
    assert ema.ema_beta(64, 0, 10_000, 0.05) == 0.0  # nothing seen yet: the average is G itself
    assert ema.ema_beta(64, 64_000, 10_000, 0.05) == pytest.approx(0.5 ** (64 / 3_200))  # ramp: 0.05 x 64k
    assert ema.ema_beta(64, 10**7, 10_000, 0.05) == pytest.approx(0.5 ** (64 / 10_000))  # capped
    assert ema.ema_beta(64, 0, 10_000, 0.0) == pytest.approx(0.5 ** (64 / 10_000))  # no ramp-up
    # half-life: after half_life / batch updates with a constant beta, the old weights weigh 1/2
    assert ema.ema_beta(100, 10**9, 1000, 0.05) ** 10 == pytest.approx(0.5)


def test_ema_update_in_training_follows_the_formula_and_copies_buffers(small_shards, tmp_path):
    """After a real iteration G_ema = beta G_ema + (1 - beta) G with the formula's beta (here past
    the ramp-up), BatchNorm buffers are G's, and sampling uses G_ema unless asked for the raw G."""
    job = small_job(small_shards, tmp_path, **{"recipe.ema_kimg": 1, "recipe.ema_rampup": 0})
    engine, recipe = job.engine, job.recipe
    g_ema = engine.nets["G_ema"]
    before = [p.clone() for p in g_ema.parameters()]
    recipe.iteration(engine)  # beta = 0.5 ** (32 / 1000) from the first step without ramp-up
    beta = 0.5 ** (32 / 1000)
    G = engine.module("G")
    for old, new, g in zip(before, g_ema.parameters(), G.parameters()):
        assert torch.allclose(new, beta * old + (1 - beta) * g, atol=1e-7)
    assert any(not torch.equal(new, g) for new, g in zip(g_ema.parameters(), G.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g_ema.buffers(), G.buffers()))
    assert recipe.state_dict()["ema_images"] == 32
    assert recipe.generator(engine.nets) is g_ema
    recipe.sample_raw = True
    assert recipe.generator(engine.nets) is engine.nets["G"]
    engine.close()


# -- losses and penalties ----------------------------------------------------------------------------

def test_hinge_losses_match_the_formula(small_shards, tmp_path):
    """D: (E relu(1 - D(x)) + E relu(1 + D(G(z)))) / 2; G: -E D(G(z)). Hand-computed values."""
    cfg = load_config("gan_mnist", tiny_overrides(small_shards, tmp_path, **{"recipe.loss": "hinge"}))
    from gannet.models.recipes import make_recipe

    recipe = make_recipe(cfg)
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    # relu(1 - real) = [0, 0.5, 2] -> 2.5/3; relu(1 + fake) = [0, 1, 2.5] -> 3.5/3
    assert recipe.d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    assert recipe.g_loss(fake).item() == pytest.approx(0.5 / 3)  # -mean([-2, 0, 1.5])
    assert recipe.equilibrium()["loss_d"] == 1.0


def test_top_k_trains_g_on_the_fakes_d_rates_most_real_as_k_shrinks(small_shards, tmp_path):
    """Top-k training: G's loss sees the k highest D outputs, k falling linearly from the batch to
    topk x batch over topk_kimg thousand images (all ranks); topk=1 keeps every fake."""
    from types import SimpleNamespace

    from gannet.models.recipes import make_recipe

    cfg = load_config("gan_mnist", tiny_overrides(small_shards, tmp_path, **{
        "recipe.loss": "hinge", "recipe.topk": 0.5, "recipe.topk_kimg": 0.128}))  # 128 images = 2 steps of 32 x 2 ranks
    recipe, step = make_recipe(cfg), SimpleNamespace(accumulation=1, world=2)
    out = torch.tensor([0.25, -2.0, 1.0, 0.0, -0.5, 2.0, -1.0, 0.5])
    kept = lambda: sorted(recipe.top_k(out, step).tolist(), reverse=True)  # noqa: E731
    assert kept() == sorted(out.tolist(), reverse=True)  # step 0: the whole batch
    recipe.g_steps = 1  # halfway: k = ceil(8 x (1 - 0.5 x 0.5)) = 6
    assert kept() == [2.0, 1.0, 0.5, 0.25, 0.0, -0.5]
    recipe.g_steps = 5  # past topk_kimg: k = 8 x 0.5
    assert kept() == [2.0, 1.0, 0.5, 0.25]
    assert recipe.g_loss(recipe.top_k(out, step)).item() == pytest.approx(-0.9375)  # hinge G: -mean of the four
    off = make_recipe(load_config("gan_mnist", tiny_overrides(small_shards, tmp_path)))
    off.g_steps = 5
    assert torch.equal(off.top_k(out, step), out)
    with pytest.raises(ConfigError, match="recipe.topk"):
        load_config("gan_mnist", tiny_overrides(small_shards, tmp_path, **{"recipe.topk": 0}))


class TinyD(nn.Module):
    """A nonlinear critic whose input gradient depends on the input (so the penalties are not constant)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 1)
        self.text = nn.Linear(5, 4 * 6 * 6)

    def forward(self, x, text=None):
        h = torch.tanh(self.conv(x)).flatten(1)
        if text is not None:
            h = h * self.text(text)
        return self.fc(h).flatten()


def per_sample_grads(D, xs, *rest):
    """The reference: one image at a time, each gradient by its own plain autograd call."""
    grads = []
    for i in range(xs[0].shape[0]):
        leaves = [x[i : i + 1].clone().requires_grad_(True) for x in xs]
        grads.append(torch.autograd.grad(D(*leaves, *[r[i : i + 1] for r in rest]).sum(), leaves))
    return grads


def test_r1_wgan_gp_and_ma_gp_match_a_per_sample_autograd_reference():
    """Each penalty against its definition computed image by image, and its gradient reaches D's
    weights (the double backward the training step needs)."""
    D = TinyD()
    real, fake, text = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8), torch.randn(5, 5)
    ref_r1 = torch.stack([g[0].square().sum() for (g,) in per_sample_grads(D, [real])]).mean()
    got = penalties.r1(D, real)
    assert got.item() == pytest.approx(ref_r1.item(), rel=1e-5)
    got.backward()
    assert D.conv.weight.grad is not None and D.conv.weight.grad.abs().sum() > 0

    eps = torch.rand(5, 1, 1, 1, generator=torch.Generator().manual_seed(3))
    mixed = eps * real + (1 - eps) * fake
    ref_gp = torch.stack([(g[0].norm() - 1) ** 2 for (g,) in per_sample_grads(D, [mixed])]).mean()
    assert penalties.wgan_gp(D, real, fake, generator=torch.Generator().manual_seed(3)).item() == pytest.approx(ref_gp.item(), rel=1e-5)

    ref_ma = torch.stack([torch.cat([gx.flatten(), gs.flatten()]).norm() ** 6 for gx, gs in per_sample_grads(D, [real, text])]).mean()
    assert penalties.ma_gp(D, real, text, 6.0).item() == pytest.approx(ref_ma.item(), rel=1e-4)


def test_lazy_r1_runs_every_nth_d_step_scaled_by_n(small_shards, tmp_path):
    """r1_every=3: the penalty term is in D's loss on D steps 0, 3, 6, with weight gamma/2 x 3."""
    job = small_job(small_shards, tmp_path, **{"recipe.r1_gamma": 2.0, "recipe.r1_every": 3})
    recipe, engine = job.recipe, job.engine
    D, real = engine.nets["D"], engine.batch()["image"]
    applied = []
    for _ in range(7):
        term, stats = recipe.d_penalty(D, real, real, ())
        applied.append(term is not None)
        if term is not None:
            assert term.item() == pytest.approx(0.5 * 2.0 * 3 * penalties.r1(D, real).item(), rel=1e-4)
            assert stats["r1"].item() == pytest.approx(penalties.r1(D, real).item(), rel=1e-4)
    assert applied == [True, False, False, True, False, False, True]
    engine.close()


# -- augmentation ------------------------------------------------------------------------------------

def test_diffaugment_reaches_every_d_input_and_is_differentiable(small_shards, tmp_path):
    """With DiffAugment every image D sees (real and fake in D's step, fake in G's step) is
    augmented: cutout leaves a half-side square of exact zeros, which a real digit (background -1)
    or a Tanh fake never has. And G's loss has a gradient through the augmentation."""
    job = small_job(small_shards, tmp_path, **{"recipe.augment": "diffaugment", "recipe.diffaugment": "translation,cutout"})
    engine, recipe = job.engine, job.recipe
    seen = []
    hook = engine.module("D").register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    recipe.iteration(engine)
    hook.remove()
    assert len(seen) == 3  # real, fake (D step), fake (G step)
    for x in seen:  # the square is clipped at the border: at least a 7 x 7 quarter of it is inside
        assert ((x == 0).flatten(1).sum(1) >= 7 * 7).all(), "an image reached D without its cutout square"

    torch.manual_seed(0)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, requires_grad=True)

    def seeded(inp):  # gradcheck calls it many times: the same draw each time
        torch.manual_seed(1)
        return augment.diff_augment(inp, augment.parse_policy("color,translation,cutout"))

    assert torch.autograd.gradcheck(seeded, (x,))
    torch.manual_seed(1)
    out = augment.ada_augment(x, 0.7)
    out.sum().backward()
    assert x.grad.abs().sum() > 0


def test_diffaugment_draws_the_same_transform_for_the_same_random_state():
    """The transform is a function of the draw alone, not of the image: applied after the same
    random state, real and fake images get the same shift and the same cutout (linear ops commute
    with adding images)."""
    real, fake = torch.randn(6, 1, 16, 16), torch.randn(6, 1, 16, 16)
    ops = augment.parse_policy("translation,cutout")
    outs = []
    for x in (real, fake, real + fake):
        torch.manual_seed(5)
        outs.append(augment.diff_augment(x, ops))
    assert torch.allclose(outs[0] + outs[1], outs[2], atol=1e-6)
    assert not torch.allclose(outs[0], real)


def test_ada_p_rises_above_the_target_and_falls_below_it():
    """r_t = E sign(D(x)) on real images: above 0.6 (D overfits) p rises by interval x batch /
    speed, below it p falls; clipped to [0, 1]; decided on the rank mean."""
    ada = augment.AdaController(target=0.6, interval=2, speed_images=1000)
    mean = lambda t: t  # noqa: E731  (one rank)
    ada.observe(torch.tensor([1.0, 2.0, 3.0, -1.0, 5.0]), 0.0)  # r_t = 3/5 + ... = (4 - 1)/5 = 0.6
    ada.observe(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]), 0.0)  # now (3 + 5) / 10 = 0.8
    assert ada.after_step(50, mean) is None  # not an adjustment step
    assert ada.after_step(50, mean) == pytest.approx(0.8)
    assert ada.p == pytest.approx(100 / 1000)
    ada.observe(torch.tensor([-1.0, -1.0]), 0.0)
    ada.after_step(50, mean)
    ada.after_step(50, mean)
    assert ada.p == pytest.approx(0.0)  # fell back, not below 0


# -- spectral norm ---------------------------------------------------------------------------------

def test_spectral_norm_bounds_each_layer_and_its_state_is_in_the_state_dict():
    """After some power iterations (training-mode forwards) every normalised weight has largest
    singular value ~1; u and v are buffers in the state dict, so checkpoints carry them."""
    torch.manual_seed(0)
    net = spectral_normalize(nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 1)))
    for _ in range(30):
        net(torch.randn(2, 1, 8, 8))
    conv, fc = net[0], net[2]
    assert torch.linalg.matrix_norm(conv.weight.flatten(1), ord=2).item() == pytest.approx(1.0, abs=0.02)
    assert torch.linalg.matrix_norm(fc.weight, ord=2).item() == pytest.approx(1.0, abs=0.02)
    keys = set(net.state_dict())
    assert {"0.parametrizations.weight.0._u", "0.parametrizations.weight.0._v", "2.parametrizations.weight.original"} <= keys


# -- the engine: resume and processes -----------------------------------------------------------------

def test_sigkill_then_resume_is_bit_identical_with_ema_sn_ada_and_lazy_r1(small_shards, tmp_path):
    """A run with every stateful switch (G EMA, spectral norm's u/v, ADA's p and tally, lazy R1's
    counter) killed mid-run resumes to the uninterrupted run's weights, state and metrics exactly."""
    extra = {"train.steps": 30, "train.checkpoint_every": 10, "train.sample_every": 30, "recipe.ema_kimg": 1,
             "recipe.r1_gamma": 1.0, "recipe.r1_every": 3, "recipe.augment": "ada", "recipe.ada_interval": 1,
             "recipe.ada_kimg": 1, "model.spectral_norm": "d", "model.d_norm": "none"}
    overrides = lambda run: tiny_overrides(small_shards, run, **extra)  # noqa: E731
    gannet("train", "lsgan_mnist", *overrides(tmp_path / "straight"))
    killed = tmp_path / "killed"
    kill_when([sys.executable, "-m", "gannet", "train", "lsgan_mnist", *overrides(killed)],
              (killed / "checkpoints" / "step-00000020").exists)
    assert not (killed / "checkpoints" / "step-00000030").exists()
    gannet("train", "lsgan_mnist", *overrides(killed), "resume=auto")
    final_a, final_b = (run / "checkpoints" / "step-00000030" for run in (tmp_path / "straight", killed))
    for name in ("G", "D", "G_ema"):
        a, b = load_file(str(final_a / f"{name}.safetensors")), load_file(str(final_b / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs"
    d_keys = load_file(str(final_a / "D.safetensors")).keys()
    assert any(k.endswith("._u") for k in d_keys) and any(k.endswith("._v") for k in d_keys)
    state_a, state_b = (load_state(p / "rank0")["recipe"] for p in (final_a, final_b))
    assert state_a == state_b and state_a["ada"]["p"] > 0 and state_a["r1_calls"] == 30
    assert without_perf(metrics(killed)) == without_perf(metrics(tmp_path / "straight"))
    assert "train/ada_p" in metrics(killed)[-1]


def test_ema_r1_and_diffaugment_agree_under_ddp_and_zero3_on_two_processes(tmp_path):
    """The same 2-process job under DDP and under DeepSpeed with G at ZeRO-3 (its parameters
    sharded) and D at ZeRO-2: R1's double backward works through the D engine, and G_ema, averaged
    inside a gather of G's full weights, matches the DDP run's (an average of shards would not even
    have the right shapes). D at ZeRO-3 with a penalty is refused by the config (see below)."""
    switches = [f"{k}={v}" for k, v in {**QUALITY, "recipe.r1_every": 2, "recipe.ema_rampup": 0}.items()]
    initial = harness(tmp_path / "init.st", 1, *switches, steps=0)
    ddp = harness(tmp_path / "ddp.st", 2, *switches)
    zero3 = harness(tmp_path / "zero3.st", 2, *switches, "train.strategy=deepspeed", "optim.g.zero_stage=3", "optim.d.zero_stage=2")
    assert_same_weights(zero3, ddp, initial)
    g = {k[2:]: v for k, v in zero3.items() if k.startswith("G.")}
    assert any(not torch.equal(zero3[f"G_ema.{k}"], v) for k, v in g.items())  # an average, not a copy


def test_a_penalty_on_a_zero3_discriminator_is_refused_before_the_run(small_shards, tmp_path):
    """ZeRO-3 frees D's weights before a gradient penalty's second backward: one clear line at load."""
    from gannet.trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="optim.d.zero_stage <= 2"):
        load_config("lsgan_mnist", tiny_overrides(small_shards, tmp_path, **{
            "recipe.r1_gamma": 1, "train.strategy": "deepspeed", "optim.d.zero_stage": 3}))
    load_config("lsgan_mnist", tiny_overrides(small_shards, tmp_path, **{"train.strategy": "deepspeed", "optim.d.zero_stage": 3}))


# -- CycleGAN measured -------------------------------------------------------------------------------

class Translator:
    """A stand-in for a trained CycleGAN: identity (translates nothing), or swap (answers each image
    with a held-out image of the other domain: a perfect translator as far as domains go)."""

    def __init__(self, other: dict | None = None):
        self.other = other

    def translate(self, nets, images, direction):
        if self.other is None:
            return images
        return self.other[direction][: len(images)]


def test_translation_eval_tells_a_translator_from_the_identity(silhouettes, tmp_path):
    """`gannet eval` on a translation run scores held-out testA/testB translations with a domain
    classifier trained on the real training images: the identity map gets ~0% translation accuracy
    and cycle L1 0; a map onto real target-domain images gets ~100% and a low FID."""
    from pathlib import Path

    from gannet.trainer.evaluation.translation import (
        evaluate_translation,
        heldout_folder,
        read_folder,
    )

    full = silhouettes["full"]
    cfg = load_config("cyclegan_silhouettes", [f"data.shards={full}/a-*.tar", f"data.shards_b={full}/b-*.tar",
                                               "log.wandb=disabled", f"run_dir={tmp_path}"])
    identity = evaluate_translation(tmp_path, cfg, Translator(), Path("step-0"), {})
    assert identity["extractor"]["heldout_accuracy"] > 0.9  # horses and zebras are told apart on held-out images
    assert identity["translation_accuracy_ab"] < 0.15 and identity["translation_accuracy_ba"] < 0.15
    assert identity["cycle_l1_a"] == identity["cycle_l1_b"] == 0.0
    held = {d: read_folder(heldout_folder(cfg, d), cfg) for d in "AB"}
    swap = evaluate_translation(tmp_path, cfg, Translator({"AtoB": held["B"], "BtoA": held["A"]}), Path("step-0"), {})
    assert swap["translation_accuracy_ab"] > 0.85 and swap["translation_accuracy_ba"] > 0.85
    assert swap["fid_ab"] < identity["fid_ab"] / 3 and swap["fid_ba"] < identity["fid_ba"] / 3
    # The floor is the target domain's own held-out images: translations that are those images sit on it.
    for key in ("ab", "ba"):
        assert swap[f"fid_{key}"] == pytest.approx(swap[f"fid_{key}_floor"]) and swap[f"fid_{key}_ratio"] == pytest.approx(1.0)
        assert swap[f"kid_{key}"] == pytest.approx(swap[f"kid_{key}_floor"])
        assert identity[f"fid_{key}_ratio"] > 3 and identity[f"kid_{key}"] > identity[f"kid_{key}_floor"]
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert {"translation_accuracy_ab", "translation_accuracy_ba", "fid_ab", "fid_ba", "cycle_l1_a", "cycle_l1_b"} <= set(saved)


def test_gannet_eval_scores_a_cyclegan_run(silhouettes, tmp_path):
    """The CLI end to end on a tiny CycleGAN run (a few steps on the bundled silhouettes)."""
    run_dir = tmp_path / "run"
    full = silhouettes["full"]
    gannet("train", "cyclegan_silhouettes", f"data.shards={full}/a-*.tar", f"data.shards_b={full}/b-*.tar",
           "model.g_width=4", "model.d_width=4", "train.steps=4", "train.log_every=2", "train.sample_every=4",
           "train.checkpoint_every=2", "optim.g.decay_from=2", "optim.d.decay_from=2", "log.wandb=disabled",
           f"run_dir={run_dir}")
    out = gannet("eval", str(run_dir), "--steps", "all").stdout
    assert "translation accuracy A->B" in out and "held-out cycle L1" in out and "real floor" in out
    assert "step 2: FID ratio A->B" in out and "step 4:" not in out  # earlier checkpoints as history lines, the last in full
    result = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert 0 <= result["translation_accuracy_ab"] <= 1 and result["cycle_l1_a"] > 0
    assert [row["step"] for row in result["over_steps"]] == [2, 4] and result["checkpoint"] == "step-00000004"
    assert result["over_steps"][-1]["fid_ba_ratio"] == result["fid_ba_ratio"]
