"""The recipe contract: everything a GAN recipe may and must do (docs/architecture.md shows it at work).

A recipe is the GAN: which networks exist, how one training iteration updates them, what a sample
is made from, and what state it keeps beyond the networks. It sees the rest of gannet through two
narrow interfaces declared here, so it never touches devices, process groups or files:

- `Step`, during an iteration: the wrapped networks, a fresh real batch, noise, `update` (backward
  + optimizer step, however the engine does it) and `frozen` (a network used inside another
  network's update, with no gradient of its own). `update` is called once per micro-batch with the
  plain loss; the engine scales it for gradient accumulation and steps on the last micro-batch.
- `Examples`, the run's real data as far as a recipe may read it (the first real images for grids
  of translations, the captions that prompt a text-to-image grid); the loop, the sampler and the
  evaluator hand it over.

The loop, sampler, evaluator and bench call only what `Recipe` declares, and read the declared
capabilities (`condition`, `translates`, `optimized`) instead of probing for methods.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import ClassVar, Literal, Mapping, Protocol

import torch
from torch import nn

from gannet.models import augment, ema, networks, penalties
from gannet.trainer.config.schema import Config
from gannet.trainer.errors import ConfigError, GannetError


class Step(Protocol):
    """What a recipe sees of the engine inside `iteration`."""

    nets: Mapping[str, nn.Module]
    accumulation: int  # micro-batches per optimizer step: call `update` this many times per step
    skipped: set[str]  # networks whose latest optimizer step was skipped (a non-finite loss or gradient)
    world: int  # processes taking part (a global batch is world x accumulation x the batch)

    def batch(self) -> dict[str, torch.Tensor]: ...

    def noise(self, n: int, dim: int) -> torch.Tensor: ...

    def update(self, name: str, loss: torch.Tensor) -> None: ...

    def frozen(self, name: str) -> AbstractContextManager: ...

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """`values` averaged over ranks (every rank calls it; ADA decides its p from it)."""
        ...

    def module(self, name: str) -> nn.Module:
        """The plain network under its DDP / DeepSpeed wrapper (same parameters, no wrapper hooks):
        what a gradient penalty runs its own forward and input-gradient through."""
        ...

    def gathered(self, name: str) -> AbstractContextManager[nn.Module]:
        """The plain network `name` with its full parameters inside the block (ZeRO-3 gathers its
        shards, read-only; elsewhere they are whole already): what an EMA of G averages."""
        ...


class Examples(Protocol):
    """The run's real data, read for a recipe by whoever runs it (gannet.trainer.data.stream.ShardExamples)."""

    def images(self, n: int) -> dict[str, torch.Tensor]:
        """The first `n` readable images of each stream, keys as in a batch (`image`, `image_b`)."""
        ...

    def captions(self, n: int, source: str = "") -> list[tuple[str, int]]:
        """(caption, class or -1) of the first `n` captioned samples of `source` (a shard pattern;
        "" = the run's held-out split, else its training shards)."""
        ...


@dataclass(frozen=True)
class GeneratorInput:
    """One input of a generator as it leaves gannet (`gannet export`): what a caller feeds it, by name."""

    name: str  # its name in an exported file: z, label, text_emb, image
    # noise: N(0, I); label: a class index (int64); embedding: a sentence embedding made by `encoder`;
    # image: a real image in [-1, 1] (an export takes it in the file's pixel range; its H and W are free)
    kind: Literal["noise", "label", "embedding", "image"]
    shape: tuple[int, ...]  # one sample's shape (an image's: channels, H, W as trained)
    classes: int = 0  # label: how many classes there are
    encoder: str = ""  # embedding: the data.text_encoder that makes it (gannet.models.text)


@dataclass
class Generator:
    """A trained generator that a run hands out (`gannet export`): `module(*inputs)` in the order of
    `inputs` returns images in [-1, 1], or a tuple whose first item they are (a text G adds its KL)."""

    module: nn.Module
    inputs: tuple[GeneratorInput, ...]
    weights: str  # which network's weights it holds, as a checkpoint names them: G_ema, G, G.AB


def d_scale(*outputs: torch.Tensor) -> torch.Tensor:
    """The scale of D's raw outputs: the mean of |D| over each set of outputs, averaged (a mean of
    squares would overflow float32 where the outputs themselves are still finite)."""
    return torch.stack([out.detach().float().abs().mean() for out in outputs]).mean()


@dataclass
class RecipeParams:
    """The `recipe:` section of a config. Each recipe subclasses it with its own typed fields."""

    name: ClassVar[str] = ""

    def validate(self) -> None:
        """Reject values that type-check but cannot work (called when the config loads)."""

    @property
    def batches_per_step(self) -> int:
        """Real batches one generator step draws (before accumulation): what images/s counts."""
        return 1

    @property
    def double_backward(self) -> tuple[str, ...]:
        """Networks whose loss holds a gradient of their own output (a gradient penalty): they need a
        double backward, which works under DDP and ZeRO 0-2 but not ZeRO-3 (the config refuses it)."""
        return ()


class Recipe(ABC):
    """A GAN. Subclass it, decorate the subclass with `gannet.models.recipes.register`, and give it a
    `Params` dataclass whose `name` is what `recipe.name` selects in a config.

    Declared capabilities, read by the loop, sampler, evaluator and bench:
    - `condition`: what G draws from besides noise: "" (nothing), "label" (a class: `gannet sample
      --label`) or "text" (a caption: `--text`, which needs `encode`).
    - `translates`: G maps images to images (CycleGAN): sampling takes `--direction`, not noise.
    - `optimized`: the networks of `build()` that get an optimizer, an LR schedule and a
      distributed wrapper. Any other network `build()` returns (an EMA copy of G, say) is the
      recipe's own to maintain inside `iteration`: the engine moves it to the device, never gives it
      gradients, and checkpoints restore it like the others.
    """

    Params: ClassVar[type[RecipeParams]] = RecipeParams
    condition: ClassVar[Literal["", "label", "text"]] = ""
    translates: ClassVar[bool] = False
    optimized: ClassVar[tuple[str, ...]] = ("G", "D")
    # Set by `gannet sample/eval --raw`: `generate` uses the trained G even where the recipe keeps
    # an average of it (G_ema), which it uses by default.
    sample_raw: bool = False

    def __init__(self, params: RecipeParams, cfg: Config, examples: Examples | None = None):
        self.params = params
        self.cfg = cfg
        self.examples = examples

    @abstractmethod
    def build(self) -> dict[str, nn.Module]:
        """Fresh networks, by name; the caller seeds the RNG first, so every rank builds the same."""

    @abstractmethod
    def iteration(self, step: Step) -> dict[str, torch.Tensor]:
        """One generator step and what preceded it. Returns what the dashboards show: scalar
        tensors are averaged over ranks and logged as `train/<key>`; tensors with a batch dimension
        are rank 0's values, shown as W&B histograms."""

    @abstractmethod
    def equilibrium(self) -> dict[str, float]:
        """Where the game settles when G matches the data (`loss_d`, `d_real`, `d_fake`), and
        `separation`: the largest gap between D(x) and D(G(z)) a perfect discriminator reaches."""

    @abstractmethod
    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Inputs for `n` samples (noise from `generator`; classes, prompts or real images): behind
        every sample grid of a run, and every evaluation. Integer `label` (-1 = none) and `prompt`
        entries are what the evaluator scores a sample against."""

    @abstractmethod
    def generate(self, nets: Mapping[str, nn.Module], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Images from `fixed_inputs`-style inputs (no gradients; networks in eval mode)."""

    def generators(self, nets: Mapping[str, nn.Module]) -> dict[str, Generator]:
        """The generators this run hands out as files (`gannet export`), by name ("G"; CycleGAN's
        "AtoB" and "BtoA"): plain modules and the inputs they take, so an export needs no recipe code
        and the engine never asks which GAN it runs. `sample_raw` picks G over its average here too."""
        del nets
        raise GannetError(f"recipe {self.params.name} hands out no generator for export")

    def captions(self, inputs: Mapping[str, torch.Tensor]) -> list[str]:
        """What each sample of `inputs` was asked to show, in words: the prompts table beside a
        grid, and the captions `gannet eval` checks the samples against. None without a condition."""
        del inputs
        return []

    def encode(self, captions: list[str]) -> torch.Tensor:
        """Caption embeddings for G (recipes with condition "text" must implement it)."""
        raise GannetError(f"recipe {self.params.name} does not draw from captions")

    def translate(self, nets: Mapping[str, nn.Module], images: torch.Tensor, direction: str) -> torch.Tensor:
        """`gannet sample RUN --direction AtoB|BtoA` (recipes that declare `translates`)."""
        raise GannetError(f"recipe {self.params.name} does not translate images")

    def state_dict(self) -> dict:
        """This rank's recipe state beyond the networks (an image pool, a counter). Checkpoints keep
        it per rank: each rank's pool holds its own past fakes."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state

    def require_examples(self) -> Examples:
        """The run's data, or a clear error where the caller gave none."""
        if self.examples is None:
            raise GannetError(f"recipe {self.params.name} reads the run's data here, and none was given")
        return self.examples


@dataclass
class AdversarialParams(RecipeParams):
    d_steps: int = 1  # k discriminator steps per generator step (Goodfellow et al., Algorithm 1)
    # Generator EMA (StyleGAN2-ADA): G_ema samples, G trains.
    ema_kimg: float = 0.0  # EMA of G: half-life in thousands of images (0 = off; StyleGAN2-ADA: 10)
    ema_rampup: float = 0.05  # EMA ramp-up: the half-life is at most this x the images seen so far (0 = none)
    ema_start: int = 0  # the G step the EMA starts averaging at (before it, G_ema copies G)
    # Gradient penalties (0 = off).
    r1_gamma: float = 0.0  # R1 weight: gamma / 2 x E ||grad_x D(x)||^2 on real images (StyleGAN2)
    r1_every: int = 16  # lazy R1: applied every N-th D step with weight x N
    gp_weight: float = 0.0  # WGAN-GP weight on real/fake interpolates (WGAN-GP: 10)
    # Differentiable augmentation of D's inputs, real and fake alike (gannet.models.augment).
    augment: Literal["none", "diffaugment", "ada"] = "none"  # DiffAugment (fixed ops) or ADA (adaptive probability p)
    diffaugment: str = "color,translation,cutout"  # DiffAugment's ops, comma-separated
    ada_target: float = 0.6  # ADA: the target of E sign(D(x)), D's overfitting heuristic r_t
    ada_interval: int = 4  # ADA: G steps between adjustments of p
    ada_kimg: float = 50.0  # ADA: thousands of images for p to move by at most 1
    # Top-k training (Sinha et al. 2020).
    topk: float = 1.0  # G learns only from this fraction of its fakes, those D rates most real (1 = off)
    topk_kimg: float = 64.0  # thousands of images over which the fraction falls linearly from 1 to topk

    def validate(self) -> None:
        if self.d_steps < 1:
            raise ConfigError(f"recipe.d_steps={self.d_steps} must be >= 1")
        for key in ("ema_kimg", "ema_rampup", "ema_start", "r1_gamma", "gp_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"recipe.{key}={getattr(self, key)} must be >= 0")
        for key in ("r1_every", "ada_interval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"recipe.{key}={getattr(self, key)} must be >= 1")
        if not 0 < self.topk <= 1 or self.topk_kimg < 0:
            raise ConfigError(f"recipe.topk={self.topk} must be in (0, 1] and topk_kimg={self.topk_kimg} >= 0")
        if not 0 < self.ada_target < 1 or self.ada_kimg <= 0:
            raise ConfigError(f"recipe.ada_target={self.ada_target} must be in (0, 1) and ada_kimg={self.ada_kimg} > 0")
        try:
            augment.parse_policy(self.diffaugment)
        except ValueError as err:
            raise ConfigError(f"recipe.diffaugment: {err}") from None

    @property
    def batches_per_step(self) -> int:
        return self.d_steps

    @property
    def double_backward(self) -> tuple[str, ...]:
        return ("D",) if self.r1_gamma > 0 or self.gp_weight > 0 else ()


class AdversarialRecipe(Recipe):
    """One generator G(z) against one discriminator D(x), trained by Algorithm 1 of the GAN paper.

    Each iteration: k times, a real minibatch and a noise minibatch update D; then a fresh noise
    minibatch updates G through a frozen D. Subclasses supply the losses, and optionally:
    - `conditions`: what G and D see besides z and the image (class labels, caption embeddings);
    - `d_objective` / `g_objective`: whole objectives, for games with more terms (GAN-CLS);
    - `d_penalty`: a regulariser that sees D's inputs (R1, WGAN-GP), added to D's loss;
    - `after_g_step`: work after G's update (an EMA copy of G).
    So the minimax and non-saturating GAN, LSGAN, the conditional GAN and the text-to-image GAN
    share one, tested, update order. The quality switches of `AdversarialParams` (G EMA, R1 /
    WGAN-GP, DiffAugment / ADA) are built on those same hooks: a subclass that overrides one calls
    super() to keep them.
    """

    Params: ClassVar[type[RecipeParams]] = AdversarialParams

    def __init__(self, params: RecipeParams, cfg: Config, examples: Examples | None = None):
        super().__init__(params, cfg, examples)
        self.ops = augment.parse_policy(params.diffaugment) if params.augment == "diffaugment" else []
        self.ada = augment.AdaController(params.ada_target, params.ada_interval, params.ada_kimg * 1000)
        self.lazy_r1 = penalties.LazyCounter(params.r1_every, cfg.train.grad_accum)
        self.g_steps, self.ema_images, self.last_r1 = 0, 0, 0.0

    def build(self) -> dict[str, nn.Module]:
        model, data = self.cfg.model, self.cfg.data
        nets = {
            "G": networks.build(networks.GENERATORS, model.generator, model, data),
            "D": networks.build(networks.DISCRIMINATORS, model.discriminator, model, data),
        }
        if self.params.ema_kimg > 0:
            nets["G_ema"] = copy.deepcopy(nets["G"])  # not optimised: the engine keeps it without gradients
        return nets

    def augmented(self, x: torch.Tensor) -> torch.Tensor:
        """What D sees of an image (real or fake alike): DiffAugment, ADA with the current p, or x."""
        if self.params.augment == "diffaugment":
            return augment.diff_augment(x, self.ops)
        if self.params.augment == "ada":
            return augment.ada_augment(x, self.ada.p)
        return x

    def discriminate(self, D: nn.Module, x: torch.Tensor, *cond: torch.Tensor) -> torch.Tensor:
        """D's output on an augmented image: every D forward of an objective or penalty goes through here."""
        return D(self.augmented(x), *cond)

    def decision_boundary(self) -> float:
        """D's raw output that separates "real" from "fake" answers (ADA counts real images above it)."""
        return 0.0

    @abstractmethod
    def d_loss(self, real_out: torch.Tensor, fake_out: torch.Tensor) -> torch.Tensor:
        """D's loss from its outputs on real and fake images (fp32)."""

    @abstractmethod
    def g_loss(self, fake_out: torch.Tensor) -> torch.Tensor:
        """G's loss from D's outputs on its fakes (fp32)."""

    def d_stat(self, out: torch.Tensor) -> torch.Tensor:
        """What the dashboards call D(x): a probability for the GAN, the raw score for LSGAN."""
        return out.mean()

    def conditions(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """What G and D see besides z and the image: nothing here; class labels for the conditional
        GAN. `inputs` is a training batch or a set of sampling inputs: both carry the same fields."""
        del inputs
        return ()

    def d_penalty(self, D: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                  cond: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """A term added to D's loss that needs D's inputs (a gradient penalty runs its own forward
        on them), and what it reports; (None, {}) = no penalty. `fake` is detached. Here: lazy R1
        (`r1_gamma`, reported as `r1`: its latest value) and WGAN-GP (`gp_weight`, as `gp`)."""
        p, total, stats = self.params, None, {}
        D_aug = lambda x, *c: self.discriminate(D, x, *c)  # noqa: E731  (penalties see what the loss sees)
        if p.r1_gamma > 0:
            if self.lazy_r1():
                value = penalties.r1(D_aug, real, *cond)
                total, self.last_r1 = 0.5 * p.r1_gamma * p.r1_every * value, value.item()
            stats["r1"] = torch.tensor(self.last_r1, device=real.device)
        if p.gp_weight > 0:
            gp = penalties.wgan_gp(D_aug, real, fake, *cond)
            total = p.gp_weight * gp if total is None else total + p.gp_weight * gp
            stats["gp"] = gp.detach()
        return total, stats

    def images_per_g_step(self, step: Step) -> int:
        """Fakes one G step learns from, on all ranks: what the EMA, ADA and top-k schedules count."""
        return self.cfg.data.batch_size * step.accumulation * step.world

    def after_g_step(self, step: Step) -> None:
        """Called at the end of an iteration whose G optimizer step was taken (a skipped, non-finite step
        leaves the EMA and ADA's tally as they were): the EMA of G, and ADA's p."""
        batch = self.images_per_g_step(step)
        if "G_ema" in step.nets:
            beta = self.ema_beta(batch) if self.g_steps >= self.params.ema_start else 0.0
            with step.gathered("G") as G:
                ema.update_average(step.nets["G_ema"], G, beta)
            self.ema_images += batch
        if self.params.augment == "ada":
            self.tune_ada(step, batch)
        self.g_steps += 1

    def ema_beta(self, batch: int) -> float:
        """The EMA's decay for a G step of `batch` images: StyleGAN2-ADA's half-life and ramp-up."""
        return ema.ema_beta(batch, self.ema_images, self.params.ema_kimg * 1000, self.params.ema_rampup)

    def tune_ada(self, step: Step, batch: int) -> None:
        """ADA's feedback: p follows D's tally on real images, averaged over ranks."""
        device = next(step.nets["D"].parameters()).device
        self.ada.after_step(batch, lambda t: step.mean(t.to(device)).cpu())

    def state_dict(self) -> dict:
        """Counters that exact resume needs: EMA images seen, lazy-R1 calls, ADA's p and its tally."""
        return {"g_steps": self.g_steps, "ema_images": self.ema_images, "r1_calls": self.lazy_r1.calls,
                "last_r1": self.last_r1, "ada": self.ada.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.g_steps, self.ema_images, self.last_r1 = state["g_steps"], state["ema_images"], state["last_r1"]
        self.lazy_r1.calls = state["r1_calls"]
        self.ada.load_state_dict(state["ada"])

    def d_objective(self, step: Step, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """D's loss on one real batch and as many fresh fakes, and the D outputs the dashboards show."""
        G, D, cond = step.nets["G"], step.nets["D"], self.conditions(batch)
        real = batch["image"]
        with torch.no_grad():
            fake = G(step.noise(real.shape[0], self.cfg.model.z_dim), *cond)
        # losses in fp32 under bf16/fp16
        real_out, fake_out = self.discriminate(D, real, *cond).float(), self.discriminate(D, fake, *cond).float()
        return self.with_penalty(self.d_loss(real_out, fake_out), self.d_outputs(real_out, fake_out), step.module("D"),
                                 real, fake, cond)

    def with_penalty(self, loss: torch.Tensor, stats: dict[str, torch.Tensor], D: nn.Module, real: torch.Tensor,
                     fake: torch.Tensor, cond: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """D's loss plus `d_penalty` (what every D objective ends with, the recipe's own included).
        `D` is the plain network (`step.module("D")`): a penalty differentiates D's output by its
        input, and DeepSpeed's engine takes any backward through its forward for the training one."""
        penalty, penalty_stats = self.d_penalty(D, real, fake, cond)
        if penalty is None:  # none this step (lazy R1): its stats may still report the last value
            return loss, {**stats, **penalty_stats}
        return loss + penalty, {**stats, **penalty_stats}

    def d_outputs(self, real_out: torch.Tensor, fake_out: torch.Tensor) -> dict[str, torch.Tensor]:
        """D(x) and D(G(z)) for the dashboards: the statistics, and the raw outputs as histograms.
        Every D objective reports through here once per D step, so ADA tallies D's real outputs here.
        `d_scale` (mean |D| of the raw outputs) is what the spike detector watches of D: a
        probability (d_real of the GAN) saturates at 1 while the logits behind it blow up."""
        real_out, fake_out = real_out.detach(), fake_out.detach()
        stats = {"d_real": self.d_stat(real_out), "d_fake": self.d_stat(fake_out), "d_scale": d_scale(real_out, fake_out),
                 "d_real_outputs": real_out.flatten(), "d_fake_outputs": fake_out.flatten()}
        if self.params.augment == "ada":
            self.ada.observe(real_out, self.decision_boundary())
            stats["ada_p"] = torch.tensor(self.ada.p, device=real_out.device)
        return stats

    def g_objective(self, step: Step, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """G's loss through the (frozen) D, on fresh noise with the batch's conditions."""
        G, D, cond = step.nets["G"], step.nets["D"], self.conditions(batch)
        gen_out = self.discriminate(D, G(step.noise(batch["image"].shape[0], self.cfg.model.z_dim), *cond), *cond).float()
        return self.g_loss(self.top_k(gen_out, step)), {}

    def top_k(self, gen_out: torch.Tensor, step: Step) -> torch.Tensor:
        """D's outputs on the fakes G learns from: all of them, or under top-k training the k that D
        rates most real (Sinha et al. 2020: the gradients of the fakes D rates worst tend to point G
        away from the data). k shrinks from the batch to `topk` x batch over the first topk_kimg."""
        p = self.params
        if p.topk >= 1:
            return gen_out
        images = self.g_steps * self.images_per_g_step(step)
        done = min(1.0, images / (p.topk_kimg * 1000)) if p.topk_kimg > 0 else 1.0
        k = max(1, math.ceil(len(gen_out) * (1 - done * (1 - p.topk))))
        return gen_out[gen_out.reshape(len(gen_out), -1).mean(1).topk(k).indices]  # whole samples (a PatchGAN's too)

    def iteration(self, step: Step) -> dict[str, torch.Tensor]:
        """k D-steps, then one G-step through a frozen D (the contract's return convention)."""
        for _ in range(self.params.d_steps):
            for _ in range(step.accumulation):  # micro-batches; the engine steps on the last one
                batch = step.batch()
                loss_d, d_stats = self.d_objective(step, batch)
                step.update("D", loss_d)
        with step.frozen("D"):
            for _ in range(step.accumulation):
                loss_g, g_stats = self.g_objective(step, batch)
                step.update("G", loss_g)
        if "G" not in step.skipped:  # G did not move: nothing to follow (an EMA stays as it was)
            self.after_g_step(step)
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), **d_stats, **g_stats}

    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Noise drawn from `generator` (conditional recipes add their conditions)."""
        return {"z": torch.randn(n, self.cfg.model.z_dim, generator=generator)}

    def generator(self, nets: Mapping[str, nn.Module]) -> nn.Module:
        """The generator that samples: the EMA of G where the run keeps one (unless `sample_raw`), else G."""
        return nets["G_ema"] if "G_ema" in nets and not self.sample_raw else nets["G"]

    def generate(self, nets: Mapping[str, nn.Module], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.generator(nets)(inputs["z"], *self.conditions(inputs))

    def generator_inputs(self) -> tuple[GeneratorInput, ...]:
        """What G takes, in order: z, then what `conditions` adds (conditional recipes extend it)."""
        return (GeneratorInput("z", "noise", (self.cfg.model.z_dim,)),)

    def generators(self, nets: Mapping[str, nn.Module]) -> dict[str, Generator]:
        weights = "G_ema" if "G_ema" in nets and not self.sample_raw else "G"
        return {"G": Generator(nets[weights], self.generator_inputs(), weights)}
