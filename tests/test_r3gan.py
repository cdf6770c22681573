"""R3GAN: its schedule, losses and penalties against hand-computed values and plain autograd; its
networks against the official ones (parameter counts at the presets, identity blocks, the low-pass
filter); every bundled config stepping; and the engine: DDP, ZeRO-1/2 and accumulation agreeing
with R1 + R2, the penalties in fp32 under bf16, the non-finite guard, exact resume of every schedule."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from gannet.models import networks, penalties
from gannet.models.r3gan import R3GANDiscriminator, R3GANGenerator, ResidualBlock, downsample, lowpass_kernel, upsample
from gannet.models.recipes import make_recipe
from gannet.models.schedules import cosine_decay_with_warmup
from gannet.trainer.checkpoint.statefile import load_state
from gannet.trainer.config.loader import load_config
from gannet.trainer.config.schema import ModelConfig
from gannet.trainer.data.shards import pad_to
from gannet.trainer.data.stream import open_stream, stream_urls
from gannet.trainer.engine.setup import setup
from gannet.trainer.errors import ConfigError
from gannet.trainer.loop import train
from gannet.trainer.tracking.tracker import read_metrics as metrics
from tests.conftest import gannet, without_perf
from tests.test_distributed import assert_same_weights, harness
from tests.test_guard import Poisoned
from tests.test_quality import TinyD, per_sample_grads

# R1 + R2 on every D step, as R3GAN (the CPU config r3gan_mnist is lazy, every 4th): each step's penalty is checked
TINY = {"model.widths": "[16,16,8,8]", "data.batch_size": 8, "log.wandb": "disabled", "recipe.r1_every": 1}


def overrides(shards, run_dir, **extra) -> list[str]:
    values = {**TINY, "data.shards": f"{shards}/train-*.tar", "run_dir": str(run_dir), **extra}
    return [f"{k}={v}" for k, v in values.items()]


def tiny_job(shards, run_dir, config="r3gan_mnist", **extra):
    cfg = load_config(config, overrides(shards, run_dir, **extra))
    job = setup(cfg)
    job.engine.data = open_stream(stream_urls(cfg.data), cfg.data, rank=0, world=1, seed=0)
    return job


# -- the formulas --------------------------------------------------------------------------------

def test_cosine_schedule_matches_hand_computed_values():
    """R3GAN's cosine_decay_with_warmup: base at 0, the mean halfway, final at `total` and after;
    a linear warm-up from warmup_value, then a hold at base, then the cosine over what is left."""
    lr = lambda images: cosine_decay_with_warmup(images, 2e-4, 5e-5, 2e7)  # noqa: E731  (the presets' lr)
    assert lr(0) == 2e-4 and lr(2e7) == pytest.approx(5e-5) and lr(3e7) == 5e-5
    assert lr(1e7) == pytest.approx(1.25e-4)
    assert lr(5e6) == pytest.approx(1.7803300858899e-4)  # 5e-5 + 1.5e-4 (1 + cos(pi / 4)) / 2
    assert cosine_decay_with_warmup(5e6, 0.05, 0.005, 2e7) == pytest.approx(0.0434099025767)  # CIFAR-10's gamma
    assert cosine_decay_with_warmup(5e6, 0.0, 5e6, 2e7) == pytest.approx(5e6 * 0.1464466094067)  # the EMA half-life rises
    warm = dict(warmup=1000, hold=1000)
    assert cosine_decay_with_warmup(500, 1.0, 0.0, 3000, warmup=1000, warmup_value=0.2) == pytest.approx(0.6)
    assert cosine_decay_with_warmup(1500, 1.0, 0.0, 3000, **warm) == 1.0
    assert cosine_decay_with_warmup(2500, 1.0, 0.0, 3000, **warm) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="total"):
        cosine_decay_with_warmup(0, 1.0, 0.0, 1000, warmup=1000)


def recipe(tmp_path, config="r3gan_mnist", **extra):
    return make_recipe(load_config(config, [f"{k}={v}" for k, v in {"run_dir": tmp_path, "recipe.r1_every": 1, **extra}.items()]))


def test_relativistic_and_non_saturating_losses_match_hand_computed_values(tmp_path):
    """Paired: D softplus(D(G(z)) - D(x)) and G softplus(D(x) - D(G(z))), sample by sample; the
    non-saturating ablation sums its two terms as the paper (and StyleGAN2) does."""
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    rel = recipe(tmp_path)
    assert rel.d_loss(real, fake).item() == pytest.approx(0.8132616)  # (softplus(-1) + softplus(1)) / 2
    assert rel.g_loss(fake, real).item() == pytest.approx(0.8132616)
    assert rel.d_loss(real, real.flip(0)).item() != rel.d_loss(real, real).item()  # the pairing matters
    ns = recipe(tmp_path, **{"recipe.loss": "nonsaturating"})
    assert ns.d_loss(real, fake).item() == pytest.approx(1.7232991)
    assert ns.g_loss(fake).item() == pytest.approx(0.3132617)
    assert rel.equilibrium()["loss_d"] == pytest.approx(math.log(2)) and ns.equilibrium()["loss_d"] == pytest.approx(2 * math.log(2))


class Linear(nn.Module):
    """D(x) = <w, x>: its input gradient is w for every image, so R1 = R2 = ||w||^2 by hand."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.arange(64.0).reshape(1, 1, 8, 8) / 64)

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


def test_r1_plus_r2_is_gamma_half_of_both_squared_gradient_norms(tmp_path):
    """By hand on a linear critic, against per-image autograd on a nonlinear one, and R1 alone for
    the ablation; the penalty's gradient reaches D's weights (the double backward)."""
    real, fake = torch.randn(5, 1, 8, 8), torch.randn(5, 1, 8, 8)
    r3 = recipe(tmp_path, **{"recipe.gamma": 0.5})
    term, stats = r3.d_penalty(Linear(), real, fake, ())
    w2 = (torch.arange(64.0) / 64).square().sum().item()
    assert stats["r1"].item() == pytest.approx(w2) and stats["r2"].item() == pytest.approx(w2)
    assert term.item() == pytest.approx(0.5 * 0.5 * 2 * w2) and stats["gamma"].item() == 0.5

    D = TinyD()
    term, stats = r3.d_penalty(D, real, fake, ())
    ref = [torch.stack([g[0].square().sum() for (g,) in per_sample_grads(D, [x])]).mean().item() for x in (real, fake)]
    assert [stats["r1"].item(), stats["r2"].item()] == pytest.approx(ref, rel=1e-5)
    assert term.item() == pytest.approx(0.25 * sum(ref), rel=1e-5)
    term.backward()
    assert D.conv.weight.grad.abs().sum() > 0

    alone, stats = recipe(tmp_path, **{"recipe.gamma": 0.5, "recipe.penalty": "r1"}).d_penalty(D, real, fake, ())
    assert "r2" not in stats and alone.item() == pytest.approx(0.25 * ref[0], rel=1e-5)


def test_lazy_r1_r2_runs_every_nth_d_step_scaled_by_n(tmp_path):
    """r1_every=3 (StyleGAN2's lazy regularisation, off by default): the penalty on D steps 0 and 3
    with weight gamma/2 x 3; the steps between report its last values."""
    r3, D = recipe(tmp_path, **{"recipe.gamma": 0.5, "recipe.r1_every": 3}), Linear()
    real, fake = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    w2 = (torch.arange(64.0) / 64).square().sum().item()
    calls = [r3.d_penalty(D, real, fake, ()) for _ in range(4)]
    assert [term is not None for term, _ in calls] == [True, False, False, True]
    assert calls[0][0].item() == pytest.approx(0.5 * 0.5 * 3 * 2 * w2)
    assert calls[1][1]["r2"].item() == pytest.approx(w2) and r3.state_dict()["last_penalty"]["gamma"] == 0.5


# -- the networks ----------------------------------------------------------------------------------

# Counted by building the official networks (brownvc/R3GAN at 19a7ddf: training/networks.py with
# train.py's CIFAR10 and FFHQ-256 presets, c_dim 10 for the conditional one, FP16Stages empty) on
# the meta device and summing p.numel() over their parameters.
OFFICIAL = [("r3gan_cifar10", {}, 20_781_952, 21_280_512),  # the README's --cond=1
            ("r3gan_cifar10", {"recipe.name": "r3gan", "model.generator": "r3gan", "model.discriminator": "r3gan"},
             20_732_160, 20_683_776),
            ("r3gan_ffhq256", {}, 23_057_952, 23_009_568)]


@pytest.mark.parametrize("config, extra, g_count, d_count", OFFICIAL)
def test_parameter_counts_equal_the_official_networks_at_the_presets(config, extra, g_count, d_count):
    cfg = load_config(config, [f"{k}={v}" for k, v in extra.items()])
    with torch.device("meta"):
        G = networks.build(networks.GENERATORS, cfg.model.generator, cfg.model, cfg.data)
        D = networks.build(networks.DISCRIMINATORS, cfg.model.discriminator, cfg.model, cfg.data)
    assert (sum(p.numel() for p in G.parameters()), sum(p.numel() for p in D.parameters())) == (g_count, d_count)


def test_blocks_start_as_the_identity_and_resampling_is_the_lowpass_filter(tmp_path):
    """Fix-up: each block's last layer is zero, so it passes its input through. Up/down sampling
    equal the per-channel filter [1, 3, 3, 1] x [1, 3, 3, 1] / 64 (x 4 up) with zero borders."""
    cfg = load_config("r3gan_cmnist", ["model.widths=[16,16,8,8]"])
    G = R3GANGenerator(cfg.model, cfg.data, conditional=True)
    blocks = [m for m in G.modules() if isinstance(m, ResidualBlock)]
    assert len(blocks) == 4 and all(b.project.weight.abs().sum() == 0 for b in blocks)
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(blocks[0](x), x)
    assert torch.equal(lowpass_kernel() * 64, torch.tensor([1.0, 3, 3, 1])[:, None] * torch.tensor([1.0, 3, 3, 1]))
    x, k = torch.randn(2, 3, 8, 8, dtype=torch.float64), lowpass_kernel().double()[None, None]
    up = F.conv_transpose2d(x.reshape(6, 1, 8, 8), 4 * k, stride=2, padding=1).reshape(2, 3, 16, 16)
    down = F.conv2d(x.reshape(6, 1, 8, 8), k, stride=2, padding=1).reshape(2, 3, 4, 4)
    assert torch.allclose(upsample(x), up, atol=1e-12) and torch.allclose(downsample(x), down, atol=1e-12)
    assert torch.allclose(upsample(torch.ones(1, 1, 8, 8))[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12))  # sums to 1 inside
    z, labels = torch.randn(4, cfg.model.z_dim), torch.tensor([0, 1, 2, 3])
    images = G(z, labels)
    assert images.shape == (4, 1, 32, 32) and not torch.allclose(images, G(z, labels.flip(0)))  # the class is used
    D = R3GANDiscriminator(cfg.model, cfg.data, conditional=True)
    assert D(images, labels).shape == (4,) and not torch.allclose(D(images, labels), D(images, labels.flip(0)))


def test_downsample_compiles_with_inductor_and_equals_the_filter(tmp_path, monkeypatch):
    """torch.compile (inductor, train.compile's default backend) of downsample and its backward:
    the eager form's two chained pools crash inductor's backward in torch 2.13, so under compile it
    takes the slices, which must give the same filter and the same input gradient."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # a fresh cache: really compiled here
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    k = lowpass_kernel()[None, None]

    def reference(y):
        return F.conv2d(y.reshape(6, 1, 8, 8), k, stride=2, padding=1).reshape(2, 3, 4, 4)

    weights = torch.randn(2, 3, 4, 4)
    compiled = torch.compile(lambda y: (downsample(y) * weights).sum(), backend="inductor")
    try:
        out = compiled(x)
        (grad,) = torch.autograd.grad(out, x)
    finally:
        torch._dynamo.reset()  # no compiled frames left for later tests
    filtered = (reference(x) * weights).sum()
    (expected,) = torch.autograd.grad(filtered, x)
    assert torch.allclose(out, filtered, atol=1e-5)
    assert torch.allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    ({"model.widths": "[16,16,8]"}, r"model.widths needs 4 values for data.image_size=32"),
    ({"data.image_size": 28}, r"data.image_size=28 does not fit R3GAN"),
    ({"model.cardinality": "[3,3,3,3]"}, r"model.cardinality=\[3, 3, 3, 3\]: each must divide"),
])
def test_network_plans_that_cannot_work_are_one_line_config_errors(extra, message):
    cfg = load_config("r3gan_mnist", [f"{k}={v}" for k, v in extra.items()])
    with pytest.raises(ConfigError, match=message):
        R3GANGenerator(cfg.model, cfg.data)


def test_d_widths_give_d_its_own_plan_and_leave_g_alone():
    both = load_config("r3gan_mnist", ["model.widths=[32,16,16,8]"])
    own = load_config("r3gan_mnist", ["model.widths=[32,16,16,8]", "model.d_widths=[16,16,8,8]"])
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(R3GANGenerator(own.model, own.data)) == count(R3GANGenerator(both.model, both.data))
    D = R3GANDiscriminator(own.model, own.data)
    assert D.from_image.out_channels == 8 and count(D) < count(R3GANDiscriminator(both.model, both.data))
    assert D(torch.randn(2, 1, 32, 32)).shape == (2,)
    bad = load_config("r3gan_mnist", ["model.d_widths=[16,16,8]"])
    with pytest.raises(ConfigError, match=r"model.d_widths needs 4 values for data.image_size=32"):
        R3GANDiscriminator(bad.model, bad.data)


def test_g_output_tanh_squashes_the_same_network_and_linear_is_the_paper():
    linear = load_config("r3gan_mnist", ["model.widths=[16,16,8,8]", "model.g_output=linear"])
    squashed = load_config("r3gan_mnist", ["model.widths=[16,16,8,8]", "model.g_output=tanh"])
    assert ModelConfig().g_output == "linear" and load_config("r3gan_cifar10").model.g_output == "linear"  # the paper's
    G, T = R3GANGenerator(linear.model, linear.data), R3GANGenerator(squashed.model, squashed.data)
    T.load_state_dict(G.state_dict())  # no parameters of its own
    z = torch.randn(4, linear.model.z_dim) * 8
    assert G(z).abs().max() > 1 and torch.allclose(T(z), torch.tanh(G(z)))


def test_recipe_settings_that_cannot_work_are_refused_when_the_config_loads(tmp_path):
    for extra, message in [({"recipe.r1_gamma": 1}, "leave r1_gamma"), ({"recipe.augment_p": 0.3}, "needs recipe.augment=ada"),
                           ({"model.widths": "[16, x]"}, r"model.widths\[1\]='x' must be an integer"),
                           ({"optim.d.decay_kimg": 0}, "schedule=cosine needs decay_kimg=0.0 > warmup_kimg"),
                           ({"train.strategy": "deepspeed", "optim.d.zero_stage": 3}, "optim.d.zero_stage <= 2")]:
        with pytest.raises(ConfigError, match=message):
            load_config("r3gan_mnist", [f"{k}={v}" for k, v in {"run_dir": tmp_path, **extra}.items()])
    # without a penalty nothing differentiates D twice: ZeRO-3 is allowed
    load_config("r3gan_mnist", ["recipe.gamma=0", "recipe.gamma_final=0", "train.strategy=deepspeed", "optim.d.zero_stage=3"])


def test_mnist_is_padded_with_background_not_resized():
    digits = np.random.default_rng(0).integers(0, 256, (3, 28, 28)).astype(np.uint8)
    padded = pad_to(digits, 32)
    assert padded.shape == (3, 32, 32) and np.array_equal(padded[:, 2:30, 2:30], digits)
    assert padded.sum() == digits.sum()  # the border is background (0)
    with pytest.raises(ConfigError, match="never cropped"):
        pad_to(digits, 24)


# -- every bundled config, and the schedules in training -------------------------------------------

@pytest.mark.parametrize("config", ["r3gan_cifar10", "r3gan_ffhq256"])
def test_the_gpu_presets_take_a_step_shrunk_on_cpu(config, small_shards, tmp_path):
    """The presets as shipped (conditional CIFAR-10 with ADA's scheduled p, FFHQ at 256 px),
    narrowed to 8 channels per stage and 2 images: one step, finite, every network moved."""
    stages = len(load_config(config).model.widths)
    job = tiny_job(small_shards, tmp_path, config, **{"model.widths": f"[{','.join(['16'] * stages)}]",
                                                      "model.cardinality": f"[{','.join(['2'] * stages)}]",
                                                      "data.batch_size": 2, "data.num_workers": 0})
    before = {name: [p.clone() for p in job.engine.module(name).parameters()] for name in ("G", "D")}
    out = job.recipe.iteration(job.engine)
    assert all(math.isfinite(out[k].item()) for k in ("loss_d", "loss_g", "r1", "r2", "ada_p"))
    for name, params in before.items():
        assert not all(torch.equal(a, b) for a, b in zip(params, job.engine.module(name).parameters())), name
    job.engine.close()


def test_every_schedule_moves_with_the_images_seen(small_shards, tmp_path):
    """After k steps of 8 images: Adam's lr and beta2 (the engine's), gamma, the EMA's decay and
    ADA's p (the recipe's) are each the cosine at 8k images, and the recipe counts them."""
    kimg = 0.064  # the whole cosine in 8 steps
    job = tiny_job(small_shards, tmp_path, **{"recipe.schedule_kimg": kimg, "optim.g.decay_kimg": kimg, "optim.d.decay_kimg": kimg,
                                              "optim.d.warmup_kimg": 0.016, "recipe.augment": "ada", "recipe.augment_p": 0.5,
                                              "recipe.gamma": 0.1, "recipe.gamma_final": 0.01, "optim.g.lr": 2e-4, "optim.d.lr": 2e-4,
                                              "optim.g.lr_final": 5e-5, "optim.d.lr_final": 5e-5})  # pinned: not the config's
    engine, r3 = job.engine, job.recipe
    for step in range(1, 6):
        out = r3.iteration(engine)
        for scheduler in job.schedulers.values():
            scheduler.step()
        images = 8 * step
        assert out["gamma"].item() == pytest.approx(cosine_decay_with_warmup(images - 8, 0.1, 0.01, 64))  # used in this step
        assert out["ada_p"].item() == pytest.approx(cosine_decay_with_warmup(images - 8, 0.0, 0.5, 64))
        g, d = engine.optimizers["G"].param_groups[0], engine.optimizers["D"].param_groups[0]
        assert g["lr"] == pytest.approx(cosine_decay_with_warmup(images, 2e-4, 5e-5, 64))  # for the next step
        assert d["lr"] == pytest.approx(cosine_decay_with_warmup(images, 2e-4, 5e-5, 64, warmup=16))
        assert g["betas"] == pytest.approx((0.0, cosine_decay_with_warmup(images, 0.9, 0.99, 64)))
    assert r3.state_dict()["images"] == 40
    assert r3.ema_beta(8) == pytest.approx(0.5 ** (8 / cosine_decay_with_warmup(40, 0.0, 10_000, 64)))
    engine.close()


# -- the engine ------------------------------------------------------------------------------------

def test_penalties_run_in_fp32_under_bf16_autocast(small_shards, tmp_path):
    """DDP's bf16 is autocast: the loss forwards of D compute in bf16, the R1 + R2 forward (the one
    differentiated twice) in fp32."""
    job = tiny_job(small_shards, tmp_path, **{"train.mixed_precision": "bf16"})
    seen = []
    D = job.engine.module("D")
    D.from_image.register_forward_hook(lambda m, i, o: seen.append((penalties.differentiated_twice(), o.dtype)))
    out = job.recipe.iteration(job.engine)
    assert {dtype for twice, dtype in seen if twice} == {torch.float32}
    assert {dtype for twice, dtype in seen if not twice} == {torch.bfloat16}
    assert math.isfinite(out["r1"].item()) and out["r1"].dtype == torch.float32
    job.engine.close()


def test_a_nan_batch_skips_that_update_and_the_schedules_keep_time(small_shards, tmp_path):
    """Batches 3 (D's, step 2) and 6 (G's own real batch, step 3) are NaN: D, then G, skip their
    step with weights, Adam and the EMA untouched; the recipe's images still count every step,
    as the engine's LR schedule does."""
    job = tiny_job(small_shards, tmp_path)
    engine = job.engine
    engine.data = Poisoned(engine.data, bad={3, 6})
    job.recipe.iteration(engine)
    d_before = [p.clone() for p in engine.module("D").parameters()]
    job.recipe.iteration(engine)
    assert engine.skipped == {"D"} and all(torch.equal(a, b) for a, b in zip(d_before, engine.module("D").parameters()))
    g_before, ema_before = ([p.clone() for p in engine.nets[n].parameters()] for n in ("G", "G_ema"))
    job.recipe.iteration(engine)
    assert engine.skipped == {"G"} and engine.nonfinite_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(g_before, engine.module("G").parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema_before, engine.nets["G_ema"].parameters()))
    assert job.recipe.images == 24
    engine.close()


def test_ddp_zero_1_2_accumulation_and_compile_agree_with_one_process(tmp_path):
    """R1 + R2 on two processes: DDP with two micro-batches each, and DeepSpeed with G at ZeRO-1, D
    at ZeRO-2 and torch.compile (aot_eager: graph capture, the penalties' double backward eager),
    end where one process with the whole batch ends, G_ema and the cosine schedules included."""
    switches = ["model.widths=[16,16,8,8]", "recipe.schedule_kimg=0.064", "optim.g.decay_kimg=0.064",
                "optim.d.decay_kimg=0.064", "recipe.ema_kimg=0.032", "recipe.r1_every=1"]

    def run(name: str, processes: int, *extra: str) -> dict[str, torch.Tensor]:
        return harness(tmp_path / f"{name}.st", processes, *switches, *extra, config="r3gan_mnist")

    cfg = load_config("r3gan_mnist", [*switches, "data.batch_size=16", "model.norm=none", "optim.g.lr=1e-3", "optim.d.lr=1e-3"])
    torch.manual_seed(cfg.seed)  # what the harness's setup builds before training
    initial = {f"{name}.{k}": v for name, net in make_recipe(cfg).build().items() for k, v in net.state_dict().items()}
    one = run("one", 1)
    assert_same_weights(run("ddp", 2, "train.grad_accum=2"), one, initial)
    zero = run("zero", 2, "train.strategy=deepspeed", "optim.g.zero_stage=1", "optim.d.zero_stage=2",
               "train.compile=on", "train.compile_backend=aot_eager")
    assert_same_weights(zero, one, initial)
    assert "0 graph break(s)" in (tmp_path / "zero.st.compile.txt").read_text()
    assert any(not torch.equal(one[f"G_ema.{k[2:]}"], v) for k, v in one.items() if k.startswith("G."))


RESUME = {"train.log_every": 2, "train.checkpoint_every": 6, "train.sample_every": 12, "data.num_workers": 0,
          "recipe.schedule_kimg": 0.1, "optim.g.decay_kimg": 0.1, "optim.d.decay_kimg": 0.1, "train.mixed_precision": "no"}


def straight_and_resumed(shards, tmp_path, train, **extra) -> dict[str, Path]:
    """`train` (a function of overrides) 12 steps straight, and 6 then resumed to 12; their final checkpoints."""
    def args(run: str, steps: int) -> list[str]:
        return overrides(shards, tmp_path / run, **RESUME, **extra, **{"train.steps": steps})

    train(args("straight", 12))
    train(args("split", 6))
    train([*args("split", 12), "resume=auto"])
    return {run: tmp_path / run / "checkpoints" / "step-00000012" for run in ("straight", "split")}


def assert_resumed_exactly(final: dict[str, Path], tmp_path) -> None:
    for name in ("G", "D", "G_ema"):
        a, b = (load_file(str(final[run] / f"{name}.safetensors")) for run in ("straight", "split"))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resuming"
    assert load_state(final["split"] / "rank0")["recipe"]["images"] == 96
    rows = without_perf(metrics(tmp_path / "split"))
    assert rows == without_perf(metrics(tmp_path / "straight"))
    assert rows[-1]["train/lr_g"] < rows[0]["train/lr_g"] and rows[-1]["train/beta2_d"] > rows[0]["train/beta2_d"]
    assert rows[-1]["train/gamma"] < rows[0]["train/gamma"] and rows[-1]["train/ema_half_life_kimg"] > rows[0]["train/ema_half_life_kimg"]


def test_resume_continues_every_schedule_exactly(small_shards, tmp_path):
    """Stopped at step 6 and resumed to 12 (in this process): the same weights, EMA, recipe state
    (images seen) and logged lr, beta2, gamma and EMA half-life, step for step, as the run that
    went straight through."""
    final = straight_and_resumed(small_shards, tmp_path, lambda args: train(load_config("r3gan_mnist", args)))
    assert_resumed_exactly(final, tmp_path)


@pytest.mark.slow  # ~3 fresh processes with DeepSpeed engines: about 40 s on a quiet 2-core machine
def test_deepspeed_resume_continues_every_schedule_exactly(small_shards, tmp_path):
    """The same under ZeRO-2 through the CLI: DeepSpeed restores its optimizer itself, and the cosine
    schedule sets lr and beta2 for its position whatever that restored."""
    final = straight_and_resumed(small_shards, tmp_path, lambda args: gannet("train", "r3gan_mnist", *args),
                                 **{"train.strategy": "deepspeed", "optim.g.zero_stage": 2, "optim.d.zero_stage": 2})
    assert_resumed_exactly(final, tmp_path)
