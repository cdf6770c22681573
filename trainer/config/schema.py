"""The typed config sections: plain dataclasses and nothing else.

A leaf module (it imports nothing from gannet), so that networks and recipes in models/ can be
typed against the config without importing the loader, which itself needs the recipe registry
to type the `recipe` section (gannet.trainer.config.loader). `recipe` holds the named recipe's Params.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class DataConfig:
    """Where the shards are and how samples become batches."""

    shards: str = "data/mnist/train-{000000..000008}.tar"  # brace pattern, glob, s3://bucket/prefix/, http(s)://, pipe:
    image_size: int = 28  # side in pixels: images are resized (bicubic) to image_size x image_size
    channels: int = 1  # 1 = greyscale, 3 = RGB; images are converted on decoding
    batch_size: int = 64  # per process
    num_workers: int = 1  # loader processes per rank; each reads its own shards
    shuffle_buffer: int = 1000  # samples in the seeded shuffle buffer behind each loader worker
    max_errors: int = 100  # corrupt samples/shards skipped before the run stops
    text_encoder: str = ""  # captions -> `text_emb`: minilm (bundled all-MiniLM-L6-v2), a HF model folder, hashed; "" = no text
    shards_b: str = ""  # a second, independently shuffled stream (domain B of unpaired translation, e.g. CycleGAN)
    load_size: int = 0  # resize to this side, then random-crop image_size (CycleGAN's 286 -> 256); 0 = resize only
    mirror: bool = False  # random x-flips (StyleGAN2-ADA / R3GAN --mirror=1), fixed by each sample's stream position
    retries: int = 5  # remote shards: retries of a transient network failure (per request), before the shard is skipped
    retry_backoff_s: float = 0.5  # seconds before the first retry; doubles with each one (jittered, at most 30 s)
    prefetch_factor: int = 4  # batches each loader worker keeps ready ahead of the training step


@dataclass
class ModelConfig:
    """Which registered networks to build, and their widths."""

    generator: str = "dcgan"  # the generator network, by its registered name (gannet.models.networks)
    discriminator: str = "dcgan"  # the discriminator network, by its registered name
    z_dim: int = 100  # dimensions of G's noise input z
    g_width: int = 64  # channels of G's last hidden layer (DCGAN's ngf)
    d_width: int = 64  # channels of D's first layer (DCGAN's ndf)
    norm: Literal["batch", "none"] = "batch"  # none: no BatchNorm (results independent of batch split)
    num_classes: int = 10  # label-conditional networks (dcgan_label, projection, concat)
    cond_dim: int = 128  # width of the label embedding / compressed text embedding
    cond_aug: bool = False  # text: conditioning augmentation (StackGAN), c ~ N(mu(t), sigma(t)) + KL loss
    text_norm: Literal["none", "batch"] = "none"  # text: standardise each sentence-embedding dimension (BatchNorm, no affine) before G's and D's text layers
    spectral_norm: Literal["none", "d", "both"] = "none"  # spectral normalisation (Miyato et al.) of D's, or G's and D's, weights
    d_norm: Literal["", "batch", "none"] = ""  # D's normalisation layers; "" = as `norm` (SNGAN: D without BatchNorm)
    # R3GAN's networks (generator/discriminator: r3gan, r3gan_cond): one value per stage from 4x4 up to
    # data.image_size, in G's order (D mirrors them)
    widths: list[int] = field(default_factory=list)  # r3gan: each stage's channels, 4x4 first
    d_widths: list[int] = field(default_factory=list)  # r3gan: D's own widths, same order ([] = D mirrors `widths`)
    blocks: list[int] = field(default_factory=list)  # r3gan: residual blocks per stage ([] = 2 each)
    cardinality: list[int] = field(default_factory=list)  # r3gan: groups of each block's 3x3 conv ([] = 16 expanded channels per group)
    expansion: int = 2  # r3gan: the blocks' 1x1 expansion factor
    g_output: Literal["linear", "tanh"] = "linear"  # r3gan: G's last activation; linear as the paper (photos), tanh for data that sits at the ends of the range (MNIST's black background)


@dataclass
class OptimConfig:
    """Adam for one network, with an optional linear decay to zero (as CycleGAN uses) or R3GAN's cosine."""

    lr: float = 2e-4  # Adam's learning rate
    betas: tuple[float, float] = (0.5, 0.999)  # Adam's (beta1, beta2); DCGAN: (0.5, 0.999), SNGAN/BigGAN: (0, 0.9)
    weight_decay: float = 0.0  # Adam's L2 weight decay (added to the gradient; 0 = off)
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # linear: from decay_from, the LR falls linearly to 0 at train.steps; cosine: R3GAN's (below)
    decay_from: int = 0  # step where linear decay starts (schedule=linear)
    # schedule=cosine (R3GAN): over the images G has learned from (G steps x global batch), lr goes
    # linearly from 0 to `lr` in warmup_kimg thousand images, then both lr and Adam's beta2 follow half a
    # cosine from `lr` / betas[1] to lr_final / beta2_final at decay_kimg thousand images, and stay there.
    lr_final: float = 0.0  # schedule=cosine: the learning rate at decay_kimg
    beta2_final: float = 0.0  # schedule=cosine: Adam's beta2 at decay_kimg; 0 = betas[1] throughout
    decay_kimg: float = 0.0  # schedule=cosine: thousands of images where the cosine ends
    warmup_kimg: float = 0.0  # schedule=cosine: thousands of images of linear warm-up from lr 0
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    zero_stage: Literal[0, 1, 2, 3] = 2  # DeepSpeed ZeRO stage for this network (train.strategy=deepspeed)


@dataclass
class OptimPair:
    """One optimizer per network: `optim.g` for the generator, `optim.d` for the discriminator."""

    g: OptimConfig = field(default_factory=OptimConfig)
    d: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class TrainConfig:
    """The step budget and how often the loop writes things."""

    steps: int = 3000  # generator steps (each preceded by recipe.d_steps D-steps)
    strategy: Literal["ddp", "deepspeed"] = "ddp"  # ddp: Accelerate/DDP; deepspeed: one engine per network
    grad_accum: int = 1  # micro-batches of data.batch_size per optimizer step
    # auto = bf16 where the device computes it fast (a GPU with bf16, a CPU with AVX-512 BF16 or AMX),
    # else no; the log says what was chosen and why (gannet.trainer.engine.fast)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"  # torch.compile of the optimised networks; auto = on for GPUs
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: graph capture without code generation)
    channels_last: Literal["auto", "on", "off"] = "auto"  # memory layout per network; auto = where measured faster
    adam: Literal["auto", "fused", "foreach", "loop"] = "auto"  # Adam's implementation; auto = fused
    cpu: bool = False  # force CPU even when a GPU is present
    log_every: int = 50  # steps between log lines and metrics.jsonl records; also where a preemption stop is agreed
    sample_every: int = 500  # steps between sample grids (runs/NAME/samples/step-N.png)
    checkpoint_every: int = 500  # steps between checkpoints (one is also written at the last step)
    keep_checkpoints: int = 3  # the newest N checkpoints are kept, older ones deleted
    num_samples: int = 64  # images in each sample grid (fixed noise)
    max_nonfinite: int = 20  # consecutive steps with a skipped (non-finite) update before on_nonfinite acts
    on_nonfinite: Literal["rollback", "stop"] = "rollback"  # back to the last checkpoint, or stop with a message
    rollback_lr_factor: float = 0.5  # learning rates are multiplied by this at each rollback (1 = unchanged)
    # Finite divergence (gannet.trainer.guard): each loss and D's output scale (d_scale) against the median
    # and MAD of its own last spike_window steps, on log(1 + |value|); 0 = no spike detection.
    spike_window: int = 100
    spike_threshold: float = 8.0  # a step is flagged when a value exceeds the median by this many MADs (x1.4826) ...
    spike_ratio: float = 100.0  # ... and 1 + |value| is over this many times 1 + |median|
    max_spikes: int = 3  # flagged steps in a row that roll back (as train.max_nonfinite skipped steps do)
    max_rollbacks: int = 3  # rollbacks (spikes or non-finite) one attempt may take; the next divergence stops the run
    rollback_skip: bool = False  # after a rollback, skip the batches the undone steps drew (PaLM skipped 200-500)
    dist_timeout_s: int = 600  # a collective waiting longer (a rank died or hung) fails with a clear error


@dataclass
class EvalConfig:
    """Sample-quality evaluation: `gannet eval`, and during training every `every` steps."""

    every: int = 0  # evaluate during training every N steps (0 = off; `gannet eval` works regardless)
    samples: int = 1000  # generated images per evaluation
    extractor: Literal["classifier", "inception"] = "classifier"  # feature space for FID/KID/PR
    inception: str = ""  # TorchScript FID Inception file (inception-2015-12-05.pt), for extractor=inception
    heldout: str = ""  # held-out real shards; default: val-*.tar beside the training shards


@dataclass
class LogConfig:
    """Where metrics go besides metrics.jsonl and train.log, and how the terminal shows progress."""

    wandb: Literal["offline", "online", "disabled"] = "offline"  # offline: local files, `wandb sync` uploads them later
    wandb_project: str = "gannet"  # the W&B project runs are logged to
    progress: Literal["auto", "bar", "lines"] = "auto"  # auto = bar on a terminal, lines otherwise


@dataclass
class Config:
    """A whole run: its name and seed, and one section per part of gannet."""

    name: str = "run"  # the run's name; default: the config file's name (sngan_mnist)
    seed: int = 0  # seeds the weights, the noise and the data order: the same seed trains the same run
    run_dir: str = ""  # the run's folder (config, checkpoints, samples, logs); "" = runs/<name>
    resume: Literal["never", "auto"] = "never"  # auto: continue from run_dir's latest checkpoint; never: refuse a run_dir that has one
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    recipe: Any = None  # the named recipe's Params dataclass
    optim: OptimPair = field(default_factory=OptimPair)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def images_per_step(self, world: int) -> int:
        """Real images one generator step consumes across `world` processes (k D-steps, micro-batches)."""
        return self.data.batch_size * self.train.grad_accum * self.recipe.batches_per_step * world


