"""CycleGAN (Zhu et al. 2017): unpaired image-to-image translation, as the paper and its public
PyTorch reference (junyanz/pytorch-CycleGAN-and-pix2pix, `CycleGANModel.optimize_parameters`) do it.

Two generators, G_AB: A -> B and G_BA: B -> A, and two discriminators, D_A (judges domain A) and
D_B (judges domain B). One iteration:

1. G step, both discriminators frozen: LSGAN terms ||D_B(G_AB(a)) - 1||^2 + ||D_A(G_BA(b)) - 1||^2,
   cycle terms lambda_a ||G_BA(G_AB(a)) - a||_1 + lambda_b ||G_AB(G_BA(b)) - b||_1, and identity
   terms lambda_b * lambda_identity ||G_AB(b) - b||_1 + lambda_a * lambda_identity ||G_BA(a) - a||_1.
2. D step on the same (pre-update, detached) fakes, each drawn through an image pool of 50 past
   fakes: each D's loss is 0.5 (||D(real) - 1||^2 + ||D(fake) - 0||^2), halved so D learns slower than G.

Reference names -> ours: netG_A = G "AB", netG_B = G "BA", netD_A = D "B", netD_B = D "A".

The engine sees two networks, "G" (the generator pair) and "D" (the discriminator pair): the
reference's two Adam optimizers (one over both generators, one over both discriminators; Adam's
state is per parameter, so this is the same math as four optimizers). The G loss is one joint loss
over both generators, which a DeepSpeed engine can back-propagate only if both live in it, and one
engine per optimizer keeps DDP and DeepSpeed on the same path. Checkpoints, the sample grid and
`gannet sample` still name the four networks: G.safetensors holds `AB.*` and `BA.*`, D.safetensors
`A.*` and `B.*`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from gannet.models import augment, ema, networks
from gannet.models.recipes import register
from gannet.models.recipes.base import Examples, Generator, GeneratorInput, Recipe, RecipeParams, Step, d_scale
from gannet.trainer.config.schema import Config
from gannet.trainer.errors import ConfigError

DIRECTIONS = {"AtoB": "AB", "BtoA": "BA"}


@dataclass
class CycleGANParams(RecipeParams):
    name: ClassVar[str] = "cyclegan"
    lambda_a: float = 10.0  # weight of the cycle loss A -> B -> A
    lambda_b: float = 10.0  # weight of the cycle loss B -> A -> B
    lambda_identity: float = 0.5  # identity loss weight as a fraction of lambda_a/lambda_b (0 = off)
    pool_size: int = 50  # past fakes kept per discriminator (0 = D sees only the newest fakes)
    # Not in the paper, for small data: DiffAugment (Zhao et al. 2020) of every image either D sees,
    # real or fake, in D's step and in G's step alike, with `diffaugment`'s ops; and an EMA of both
    # generators (half-life in thousands of images, 0 = off; ramp-up as recipe.ema_rampup of the
    # noise GANs) that `gannet sample` / `gannet eval` translate with (`--raw`: the trained ones).
    augment: Literal["none", "diffaugment"] = "none"  # diffaugment: D sees every image through recipe.diffaugment's ops
    diffaugment: str = "translation,cutout"  # DiffAugment's ops, comma-separated (color, translation, cutout)
    ema_kimg: float = 0.0  # half-life of the generators' EMA in thousands of images (0 = off)
    ema_rampup: float = 0.05  # with ema_kimg: the half-life is at most this fraction of the images seen so far

    def validate(self) -> None:
        for key in ("lambda_a", "lambda_b", "lambda_identity", "pool_size", "ema_kimg", "ema_rampup"):
            if getattr(self, key) < 0:
                raise ConfigError(f"recipe.{key}={getattr(self, key)} must be >= 0")
        try:
            augment.parse_policy(self.diffaugment)
        except ValueError as err:
            raise ConfigError(f"recipe.diffaugment: {err}") from None


class Pair(nn.ModuleDict):
    """Two networks behind one module, `pair(x, which)`: what the engine wraps and steps as one."""

    def forward(self, x: torch.Tensor, which: str) -> torch.Tensor:
        return self[which](x)


class ImagePool:
    """The reference's ImagePool (Shrivastava et al. 2017): D is updated on a history of generated
    images, not only the newest ones, which damps oscillation. Until the pool is full each fake is
    stored and returned; then with probability 1/2 a random stored fake is returned and replaced by
    the new one, else the new one is returned. Draws come from the torch RNG, which checkpoints keep
    per rank, and so does the pool."""

    def __init__(self, size: int):
        self.size = size
        self.images: list[torch.Tensor] = []

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size == 0:
            return images
        out = []
        for image in images.unsqueeze(1):
            if not torch.isfinite(image).all():  # from a step that is skipped: never kept, never shown to D again
                out.append(image)
            elif len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif torch.rand(()).item() > 0.5:
                index = int(torch.randint(0, self.size, ()).item())
                out.append(self.images[index].to(image))  # restored pools live on the CPU until used
                self.images[index] = image
            else:
                out.append(image)
        return torch.cat(out)


def lsgan(out: torch.Tensor, target: float) -> torch.Tensor:
    """The reference's GANLoss('lsgan'): MSE against a constant target, in fp32."""
    out = out.float()
    return F.mse_loss(out, torch.full_like(out, target))


@register
class CycleGAN(Recipe):
    Params = CycleGANParams
    translates = True

    def __init__(self, params: CycleGANParams, cfg: Config, examples: Examples | None = None):
        if not cfg.data.shards_b:
            raise ConfigError("recipe cyclegan needs unpaired data: data.shards (domain A) and data.shards_b (domain B); "
                              "write them with `gannet shards unpaired --a DIR --b DIR --out DIR`")
        super().__init__(params, cfg, examples)
        self.pools = {"A": ImagePool(params.pool_size), "B": ImagePool(params.pool_size)}
        self.ops = augment.parse_policy(params.diffaugment) if params.augment == "diffaugment" else []
        self.ema_images = 0

    def build(self) -> dict[str, nn.Module]:
        model, data = self.cfg.model, self.cfg.data
        make_g = lambda: networks.build(networks.GENERATORS, model.generator, model, data)  # noqa: E731
        make_d = lambda: networks.build(networks.DISCRIMINATORS, model.discriminator, model, data)  # noqa: E731
        nets = {"G": Pair({"AB": make_g(), "BA": make_g()}), "D": Pair({"A": make_d(), "B": make_d()})}
        if self.params.ema_kimg > 0:
            nets["G_ema"] = copy.deepcopy(nets["G"])  # not optimised: the engine keeps it without gradients
        return nets

    def judge(self, D: nn.Module, x: torch.Tensor, domain: str) -> torch.Tensor:
        """D's output on what it sees of an image: DiffAugment'ed when recipe.augment says so."""
        return D(augment.diff_augment(x, self.ops) if self.ops else x, domain)

    def iteration(self, step: Step) -> dict[str, torch.Tensor]:
        G, D, p = step.nets["G"], step.nets["D"], self.params
        fakes = []
        with step.frozen("D"):
            for _ in range(step.accumulation):  # micro-batches; the engine steps on the last one
                batch = step.batch()
                real_a = batch["image"]
                real_b = batch["image_b"].to(real_a.dtype)
                fake_b, fake_a = G(real_a, "AB"), G(real_b, "BA")
                terms = {
                    "gan_ab": lsgan(self.judge(D, fake_b, "B"), 1.0),
                    "gan_ba": lsgan(self.judge(D, fake_a, "A"), 1.0),
                    "cycle_a": p.lambda_a * F.l1_loss(G(fake_b, "BA").float(), real_a.float()),
                    "cycle_b": p.lambda_b * F.l1_loss(G(fake_a, "AB").float(), real_b.float()),
                }
                if p.lambda_identity > 0:  # a generator fed its own target domain should change nothing
                    terms["idt_b"] = p.lambda_b * p.lambda_identity * F.l1_loss(G(real_b, "AB").float(), real_b.float())
                    terms["idt_a"] = p.lambda_a * p.lambda_identity * F.l1_loss(G(real_a, "BA").float(), real_a.float())
                loss_g = sum(terms.values())
                step.update("G", loss_g)
                fakes.append((real_a, real_b, fake_a.detach(), fake_b.detach()))
        if "G_ema" in step.nets and "G" not in step.skipped:  # a skipped (non-finite) step leaves the average
            self.follow(step)

        for real_a, real_b, fake_a, fake_b in fakes:  # the fakes G made before its update, as the reference
            pooled_b = self.pools["B"].query(fake_b)  # the reference queries B's pool first (backward_D_A)
            pooled_a = self.pools["A"].query(fake_a)
            outs = {dom: (self.judge(D, real, dom), self.judge(D, fake, dom))
                    for dom, real, fake in (("B", real_b, pooled_b), ("A", real_a, pooled_a))}
            loss_d = sum(0.5 * (lsgan(real_out, 1.0) + lsgan(fake_out, 0.0)) for real_out, fake_out in outs.values())
            step.update("D", loss_d)

        return {
            "loss_g": loss_g.detach(),
            "loss_d": loss_d.detach(),
            **{k: v.detach() for k, v in terms.items()},
            "d_real": torch.stack([real_out.float().mean() for real_out, _ in outs.values()]).mean().detach(),
            "d_fake": torch.stack([fake_out.float().mean() for _, fake_out in outs.values()]).mean().detach(),
            "d_scale": d_scale(*(out for pair in outs.values() for out in pair)),
        }

    def follow(self, step: Step) -> None:
        """G_ema <- the EMA of both generators after G's update (models.ema: StyleGAN2-ADA's rule)."""
        batch = self.cfg.data.batch_size * step.accumulation * step.world
        beta = ema.ema_beta(batch, self.ema_images, self.params.ema_kimg * 1000, self.params.ema_rampup)
        with step.gathered("G") as G:
            ema.update_average(step.nets["G_ema"], G, beta)
        self.ema_images += batch

    def translator(self, nets: Mapping[str, nn.Module]) -> nn.Module:
        """The generator pair that translates: the EMA where the run keeps one (unless `sample_raw`)."""
        return nets["G_ema"] if "G_ema" in nets and not self.sample_raw else nets["G"]

    def equilibrium(self) -> dict[str, float]:
        """LSGAN with targets 0/1: D answers 1/2 when it cannot tell; loss_d sums both discriminators."""
        return {"loss_d": 0.5, "d_real": 0.5, "d_fake": 0.5, "separation": 1.0}

    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Real images, half from each domain: the grid shows a | G_AB(a) | G_BA(G_AB(a)) and the same from b."""
        del generator
        return self.require_examples().images(max(n // 2, 1))

    def generate(self, nets: Mapping[str, nn.Module], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One wide image per input: the real image, its translation, and the translation back."""
        G = self.translator(nets)
        rows = []
        for real, there, back in ((inputs["image"], "AB", "BA"), (inputs["image_b"], "BA", "AB")):
            fake = G(real, there)
            rows.append(torch.cat([real, fake, G(fake, back)], dim=-1))
        return torch.cat(rows)

    def translate(self, nets: Mapping[str, nn.Module], images: torch.Tensor, direction: str) -> torch.Tensor:
        """`gannet sample RUN --direction AtoB|BtoA`: one generator applied to a batch of real images."""
        return self.translator(nets)(images, DIRECTIONS[direction])

    def generators(self, nets: Mapping[str, nn.Module]) -> dict[str, Generator]:
        """Both directions, each a plain image -> image network (fully convolutional: any H, W it accepts)."""
        image = GeneratorInput("image", "image", (self.cfg.data.channels, self.cfg.data.image_size, self.cfg.data.image_size))
        return {direction: Generator(nets["G"][key], (image,), f"G.{key}") for direction, key in DIRECTIONS.items()}

    def state_dict(self) -> dict:
        """This rank's image pools (its own past fakes), and the images the EMA has seen."""
        return {**{dom: [image.cpu() for image in pool.images] for dom, pool in self.pools.items()},
                "ema_images": self.ema_images}

    def load_state_dict(self, state: dict) -> None:
        for dom, pool in self.pools.items():
            pool.images = list(state[dom])
        self.ema_images = state.get("ema_images", 0)  # checkpoints from before the EMA option have none
