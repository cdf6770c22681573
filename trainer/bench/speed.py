"""`gannet bench speed`: gannet's default training step against a plain eager fp32 reference step,
and the loader alone against what the step consumes, for CycleGAN 256 px (batch 1) and for the
DCGAN/LSGAN default (28 px, batch 64).

Per model, in one process: the same initial weights and the same in-memory batches go to gannet's
step (the recipe on the engine with every `auto` speed setting) and to the reference (the public
code's step re-written plainly in eager fp32), timed in turns (A, B, A, B, ...) so that both see the
same machine load; then the loader alone turns shards into decoded, augmented batches for a few
seconds. `speedup` = reference ms / gannet ms; `loader_ratio` = loader images/s / training images/s.
Each model runs in its own process (one Accelerator per process). Nothing here is asserted.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gannet.trainer.bench import loader as loaderbench
from gannet.trainer.bench.scaling import check_launch
from gannet.trainer.bench.step import interleaved, reference_cyclegan_step
from gannet.trainer.config.loader import load_config
from gannet.trainer.config.schema import Config
from gannet.trainer.engine.setup import setup

# model -> (config, its shards, written by `prepare_shards`)
MODELS = {"cyclegan_256": "cyclegan_256", "dcgan_lsgan_mnist": "lsgan_mnist"}


def reference_dcgan_step(nets: dict[str, torch.nn.Module], cfg: Config) -> Callable[[torch.Tensor], dict[str, float]]:
    """The PyTorch DCGAN example's training step (pytorch/examples, dcgan/main.py) written plainly over
    the same G and D: an Adam (lr, betas (0.5, 0.999)) each; D's gradients from a real batch and from G's
    fakes (two backwards), D steps; then G's loss through D (D not frozen, as in the example), G steps.
    Two changes make it compute what gannet's recipe computes: the loss is the recipe's (BCE on
    logits for `gan`, least squares for `lsgan`, as the LSGAN variant of the same script), each D term
    halved as the recipe reports it, and G's step draws fresh noise (Algorithm 1; the example reuses
    the D step's fakes)."""
    G, D, p = nets["G"], nets["D"], cfg.recipe
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.optim.g.lr, betas=cfg.optim.g.betas)
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.optim.d.lr, betas=cfg.optim.d.betas)
    if p.name == "lsgan":
        targets, g_scale = (p.b, p.a, p.c), 0.5

        def criterion(out: torch.Tensor, target: float) -> torch.Tensor:
            return F.mse_loss(out, torch.full_like(out, target))
    else:
        targets, g_scale = (1.0, 0.0, 1.0), 1.0

        def criterion(out: torch.Tensor, target: float) -> torch.Tensor:
            return F.binary_cross_entropy_with_logits(out, torch.full_like(out, target))

    def step(real: torch.Tensor) -> dict[str, float]:
        D.zero_grad()
        err_real = 0.5 * criterion(D(real), targets[0])
        err_real.backward()
        fake = G(torch.randn(real.shape[0], cfg.model.z_dim, device=real.device))
        err_fake = 0.5 * criterion(D(fake.detach()), targets[1])
        err_fake.backward()
        opt_D.step()
        G.zero_grad()
        err_g = g_scale * criterion(D(G(torch.randn(real.shape[0], cfg.model.z_dim, device=real.device))), targets[2])
        err_g.backward()
        opt_G.step()
        return {"loss_d": err_real.item() + err_fake.item(), "loss_g": err_g.item()}

    return step


def step_speed(cfg: Config, steps: int) -> dict[str, Any]:
    """gannet's step (every `auto` setting) vs the reference step in eager fp32: same initial weights,
    same batches, timed in turns after one warm-up call each. Both warm-up calls start from the same
    RNG state, so their losses are comparable (equal in fp32; the bf16 difference is reported)."""
    job = setup(cfg)
    engine, recipe = job.engine, job.recipe
    torch.manual_seed(cfg.seed)
    reference_nets = {name: net.to(engine.device) for name, net in recipe.build().items()}
    shape = (cfg.data.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    batches = [(torch.rand(shape, generator=torch.Generator().manual_seed(i)) * 2 - 1).to(engine.device) for i in range(4)]
    cyclegan = cfg.recipe.name == "cyclegan"

    def batch_stream() -> Iterator[dict[str, torch.Tensor]]:
        for i in itertools.count():
            yield {"image": batches[i % 4], "image_b": batches[(i + 1) % 4]} if cyclegan else {"image": batches[i % 4]}

    engine.data = batch_stream()
    reference = reference_cyclegan_step(reference_nets, cfg.optim, cfg.recipe) if cyclegan else reference_dcgan_step(reference_nets, cfg)
    calls = {"gannet": itertools.count(), "reference": itertools.count()}

    def seeded(name: str, fn: Callable[[int], dict[str, float]]) -> Callable[[], dict[str, float]]:
        def call() -> dict[str, float]:
            i = next(calls[name])
            if i == 0:
                torch.manual_seed(cfg.seed + 1)  # the same noise for both first steps
            return fn(i)
        return call

    ours = seeded("gannet", lambda i: {k: v.item() for k, v in recipe.iteration(engine).items() if v.ndim == 0})
    theirs = seeded("reference", lambda i: reference(batches[i % 4], batches[(i + 1) % 4]) if cyclegan else reference(batches[i % 4]))
    times, first = interleaved({"gannet": ours, "reference": theirs}, steps, engine.device)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    gannet_ms, reference_ms = 1000 * median(times["gannet"]), 1000 * median(times["reference"])
    losses = {who: {k: first[who][k] for k in ("loss_d", "loss_g")} for who in ("gannet", "reference")}
    result = {"gannet_ms": gannet_ms, "reference_ms": reference_ms, "speedup": reference_ms / gannet_ms,
              "gannet_times_ms": [1000 * t for t in times["gannet"]], "reference_times_ms": [1000 * t for t in times["reference"]],
              "first_step_losses": losses,
              "loss_rel_difference": {k: abs(losses["gannet"][k] - losses["reference"][k]) / abs(losses["reference"][k])
                                      for k in ("loss_d", "loss_g")},
              "settings": engine.fast.describe(), "mixed_precision": engine.fast.mixed_precision,
              "training_images_per_s": cfg.images_per_step(1) / (gannet_ms / 1000)}
    engine.close()
    return result


def synthetic_jpegs(folder: Path, n: int, size: int, seed: int) -> None:
    """`n` RGB JPEGs of `size` px (smooth colour fields plus grain, quality 90: about 24 KB each at
    256 px), for timing the JPEG decode path without a download."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.asarray(low, dtype=np.float32) + rng.normal(0, 10, (size, size, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def prepare_shards(tmp: Path) -> dict[str, list[str]]:
    """Shards the loader is timed on, per model: the bundled MNIST digits (PNG, 28 px), and 256 px
    JPEG folders for both CycleGAN domains (resized to 286 and cropped to 256, as in training)."""
    from gannet.trainer.data.shards import write_mnist_shards, write_unpaired_shards

    write_mnist_shards(tmp / "mnist")
    for domain, seed in (("A", 0), ("B", 1)):
        synthetic_jpegs(tmp / domain, 200, 256, seed)
    write_unpaired_shards(tmp / "h2z", tmp / "A", tmp / "B", shard_size=25)
    return {"cyclegan_256": [f"data.shards={tmp}/h2z/a-*.tar", f"data.shards_b={tmp}/h2z/b-*.tar"],
            "dcgan_lsgan_mnist": [f"data.shards={tmp}/mnist/train-*.tar"]}


def model_bench(model: str, overrides: list[str], steps: int, seconds: float) -> dict[str, Any]:
    """One model's row: loader alone, then the step against its reference (in this process)."""
    cfg = load_config(MODELS[model], overrides)
    loader = loaderbench.loader_throughput(cfg, seconds)
    step = step_speed(cfg, steps)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not cfg.train.cpu else f"CPU ({os.cpu_count()} cores)"
    return {"config": MODELS[model], "overrides": overrides, "device": device, "image_size": cfg.data.image_size,
            "batch_size": cfg.data.batch_size, "steps_timed": steps, "threads": torch.get_num_threads(), **step,
            "loader": loader, "loader_ratio": loader["images_per_s"] / step["training_images_per_s"]}


def speed_bench(overrides: list[str], *, steps: int, seconds: float, out: Path, models: list[str] | None = None) -> dict[str, Any]:
    """Every model in its own process (all cores: the machine's default threads); the report as JSON."""
    result: dict[str, Any] = {"load_average_before": os.getloadavg(), "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_shards(Path(tmp))
        for model in models or list(MODELS):
            row_file = Path(tmp) / f"{model}.json"
            cmd = [sys.executable, "-m", "gannet.trainer.bench.speed", model, str(row_file), str(steps), str(seconds),
                   *data[model], *overrides]
            done = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
            check_launch(done, f"speed {model}")
            result["models"][model] = json.loads(row_file.read_text())
    result["load_average_after"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(format_speed(result))
    return result


def format_speed(result: dict[str, Any]) -> str:
    lines = [f"gannet bench speed (load average {result['load_average_before'][0]:.2f} before, "
             f"{result['load_average_after'][0]:.2f} after)",
             f"{'model':>18} {'px':>4} {'batch':>5} {'gannet ms':>10} {'ref ms':>9} {'speedup':>8} "
             f"{'loader img/s':>12} {'train img/s':>11} {'loader ratio':>12}"]
    for name, r in result["models"].items():
        lines.append(f"{name:>18} {r['image_size']:>4} {r['batch_size']:>5} {r['gannet_ms']:>10.1f} {r['reference_ms']:>9.1f} "
                     f"{r['speedup']:>7.2f}x {r['loader']['images_per_s']:>12.1f} {r['training_images_per_s']:>11.1f} "
                     f"{r['loader_ratio']:>11.1f}x")
    for name, r in result["models"].items():
        lines.append(f"{name}: {r['device']}, {r['threads']} threads; {r['settings']}")
        lines.append(f"  first-step losses gannet {r['first_step_losses']['gannet']} reference {r['first_step_losses']['reference']}")
    return "\n".join(lines)


if __name__ == "__main__":
    row = model_bench(sys.argv[1], sys.argv[5:], int(sys.argv[3]), float(sys.argv[4]))
    Path(sys.argv[2]).write_text(json.dumps(row, indent=2))
