"""Text-to-image GAN (Reed et al. 2016, "Generative Adversarial Text to Image Synthesis").

G(z, phi(t)) draws an image for a caption t, where phi is a frozen sentence encoder
(data.text_encoder; gannet.models.text) and G compresses phi(t) before concatenating it to z
(gannet.models.conditional). The discriminator is matching-aware (GAN-CLS): besides real images with
their captions (say "yes") and fakes with their captions (say "no"), it sees real images with a
mismatched caption (say "no"), so it must judge whether image and text agree, not only whether
the image looks real. Its loss is log D(x, h) + (log(1 - D(x, h')) + log(1 - D(G(z, h), h))) / 2,
reported halved like the GAN's.

Options, as in the paper and StackGAN:
- `interpolate` (GAN-INT): G also draws for beta * h1 + (1 - beta) * h2 of two captions in the
  batch, which D (without a real image for it) judges; it fills the gaps between captions.
- `model.cond_aug` (conditioning augmentation): c ~ N(mu(h), sigma(h)) and a KL penalty
  (`kl_weight`) against N(0, I).
- `mode_seeking` (MSGAN, Mao et al. 2019): G also draws a second image for each caption from
  other noise and pays weight / (mean |G(z1, h) - G(z2, h)| / mean |z1 - z2|). A caption's
  embedding varies with its phrasing, so G can take all its variety from the text and ignore z:
  every caption then gets one image (recall near 0). The term makes ignoring z expensive.
The mismatched caption of a sample is its batch neighbour's (the batch rolled by one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch
from torch import nn

from gannet.models import conditional, penalties
from gannet.models.recipes import register
from gannet.models.recipes.base import GeneratorInput, Step
from gannet.models.recipes.cgan import check_networks
from gannet.models.recipes.gan import GAN, GANParams
from gannet.models.text import SentenceEncoder, embedding_dim
from gannet.trainer.errors import ConfigError


@dataclass
class T2IParams(GANParams):
    name: ClassVar[str] = "t2i"
    mismatch: bool = True  # GAN-CLS: the real-image + wrong-caption term in D's loss
    interpolate: bool = False  # GAN-INT: G also trains on interpolated caption embeddings
    int_beta: float = 0.5  # GAN-INT: weight of the first caption's embedding in the mix (0.5 = midpoint)
    kl_weight: float = 1.0  # conditioning augmentation's KL weight (used when model.cond_aug=true)
    # shards the fixed sample-grid prompts come from; default: the held-out split (eval.heldout, else
    # val-*.tar beside data.shards), else data.shards
    prompts: str = ""
    # DF-GAN's matching-aware gradient penalty: weight * E ||grad_(x, s) D(x, s)||^power on real
    # images with their own captions (DF-GAN: 2 and 6).
    ma_gp_weight: float = 0.0  # MA-GP's weight (DF-GAN: 2; 0 = off)
    ma_gp_power: float = 6.0  # MA-GP's power of the gradient norm (DF-GAN: 6)
    mode_seeking: float = 0.0  # MSGAN's weight on 1 / (image distance per noise distance) for one caption; 0 = off

    @property
    def double_backward(self) -> tuple[str, ...]:
        return ("D",) if self.ma_gp_weight > 0 else super().double_backward

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.int_beta <= 1.0:
            raise ConfigError(f"recipe.int_beta={self.int_beta} must be in [0, 1]")
        if self.mode_seeking < 0:
            raise ConfigError(f"recipe.mode_seeking={self.mode_seeking} must be >= 0 (0 = off)")


def mode_seeking_ratio(fake1: torch.Tensor, fake2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """MSGAN's ratio for two draws of the same conditions: mean |image change| / mean |noise change|."""
    return (fake1.float() - fake2.float()).abs().mean() / (z1.float() - z2.float()).abs().mean()


@register
class TextToImageGAN(GAN):
    Params = T2IParams
    condition = "text"
    PROMPT_POOL = 1000  # fixed prompts read once; grids and evaluations draw from them

    def __init__(self, params: T2IParams, cfg, examples=None):
        super().__init__(params, cfg, examples)
        if not cfg.data.text_encoder:
            raise ConfigError("recipe.name=t2i needs data.text_encoder (minilm for the bundled all-MiniLM-L6-v2, "
                              "a local Hugging Face model folder, or hashed)")
        self._encoder: SentenceEncoder | None = None
        self._prompts: list[tuple[str, int]] | None = None

    def build(self) -> dict[str, nn.Module]:
        nets = super().build()
        check_networks("t2i", nets, (conditional.TextGenerator,), (conditional.MatchingDiscriminator, conditional.TextProjectionDiscriminator))
        return nets

    def conditions(self, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return (inputs["text_emb"],)

    def d_objective(self, step: Step, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        G, D = step.nets["G"], step.nets["D"]
        real, text = batch["image"], batch["text_emb"]
        with torch.no_grad():
            fake, _ = G(step.noise(real.shape[0], self.cfg.model.z_dim), text)
        real_out, fake_out = self.discriminate(D, real, text).float(), self.discriminate(D, fake, text).float()
        real_term, fake_term = self.real_term(real_out), self.fake_term(fake_out)
        stats = self.d_outputs(real_out, fake_out)
        if not self.params.mismatch:
            return self.with_penalty(0.5 * (real_term + fake_term), stats, step.module("D"), real, fake, (text,))
        wrong_out = self.discriminate(D, real, text.roll(1, dims=0)).float()
        wrong_term = self.fake_term(wrong_out)
        stats.update(d_wrong=self.d_stat(wrong_out.detach()), loss_d_mismatch=wrong_term.detach())
        return self.with_penalty(0.5 * (real_term + 0.5 * (wrong_term + fake_term)), stats, step.module("D"), real, fake, (text,))

    def d_penalty(self, D: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                  cond: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The shared penalties (R1, WGAN-GP), plus MA-GP on real images and their matching captions."""
        total, stats = super().d_penalty(D, real, fake, cond)
        if self.params.ma_gp_weight > 0:
            gp = penalties.ma_gp(lambda x, s: self.discriminate(D, x, s), real, cond[0], self.params.ma_gp_power)
            term = self.params.ma_gp_weight * gp
            total, stats = (term if total is None else total + term), {**stats, "ma_gp": gp.detach()}
        return total, stats

    def g_objective(self, step: Step, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        G, D, text = step.nets["G"], step.nets["D"], batch["text_emb"]
        texts = [text]
        if self.params.interpolate:
            beta = self.params.int_beta
            texts.append(beta * text + (1 - beta) * text.roll(1, dims=0))
        loss, kl, drawn = 0.0, 0.0, []
        for t in texts:
            z = step.noise(t.shape[0], self.cfg.model.z_dim)
            fake, kl_t = G(z, t)
            loss, kl = loss + self.g_loss(self.top_k(self.discriminate(D, fake, t).float(), step)), kl + kl_t.float()
            drawn.append((z, fake))
        stats = {"kl": kl.detach()} if self.cfg.model.cond_aug else {}
        if self.params.mode_seeking > 0:
            (z1, fake1), z2 = drawn[0], step.noise(text.shape[0], self.cfg.model.z_dim)
            ratio = mode_seeking_ratio(fake1, G(z2, text)[0], z1, z2)
            loss, stats = loss + self.params.mode_seeking / (ratio + 1e-5), {**stats, "mode_seeking": ratio.detach()}
        return loss + self.params.kl_weight * kl, stats

    def equilibrium(self) -> dict[str, float]:
        """With GAN-CLS, D still tells mismatched pairs apart when G is perfect. Then real and fake
        matched pairs are alike and weigh 1/2 and 1/4 in D's loss, so D's best answer on them is
        2/3, and its loss is (1/2) log(3/2) + (1/4) log 3."""
        if not self.params.mismatch:
            return super().equilibrium()
        if self.params.loss == "hinge":  # matched pairs: s = 1 costs 0 + (1/4) x 2; mismatched ones sit at -1 for free
            return {"loss_d": 0.5, "d_real": 1.0, "d_fake": 1.0, "separation": 2.0}
        return {"loss_d": 0.5 * math.log(1.5) + 0.25 * math.log(3), "d_real": 2 / 3, "d_fake": 2 / 3, "separation": 1.0}

    def encode(self, captions: list[str]) -> torch.Tensor:
        if self._encoder is None:
            self._encoder = SentenceEncoder(self.cfg.data.text_encoder)
        return self._encoder(captions)

    @property
    def prompts(self) -> list[tuple[str, int]]:
        """(caption, class or -1) pairs for sample grids and evaluation, read once from the run's data."""
        if self._prompts is None:
            self._prompts = self.require_examples().captions(self.PROMPT_POOL, self.params.prompts)
        return self._prompts

    def fixed_inputs(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Noise plus prompts drawn from the prompt pool; `label` is the prompt's class (-1 if none),
        and `prompt` its index, for scoring and captioning the outputs."""
        index = torch.randint(len(self.prompts), (n,), generator=generator)
        return {**super().fixed_inputs(n, generator), "prompt": index,
                "text_emb": self.encode([self.prompts[i][0] for i in index]),
                "label": torch.tensor([self.prompts[i][1] for i in index])}

    def generate(self, nets: Mapping[str, nn.Module], inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.generator(nets)(inputs["z"], inputs["text_emb"])[0]

    def generator_inputs(self) -> tuple[GeneratorInput, ...]:
        encoder = self.cfg.data.text_encoder
        return (*super().generator_inputs(), GeneratorInput("text_emb", "embedding", (embedding_dim(encoder),), encoder=encoder))

    def captions(self, inputs: Mapping[str, torch.Tensor]) -> list[str]:
        return [self.prompts[int(i)][0] for i in inputs["prompt"]]

