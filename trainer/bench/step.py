"""`gannet bench step CONFIG`: gannet's CycleGAN training step against a plain eager
re-implementation of the reference step, timed in turns in one process.

The reference (`CycleGANModel.optimize_parameters` of the public CycleGAN code) is re-written
plainly over the same four networks, so the ratio says what gannet's engine and recipe layers cost
(or gain) on top of the arithmetic itself. Nothing here is asserted; numbers go to the terminal and JSON.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from gannet.trainer.config.loader import load_config
from gannet.trainer.config.schema import OptimPair
from gannet.trainer.engine.setup import setup


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_cyclegan_step(nets: dict[str, torch.nn.Module], optim: OptimPair,
                            params: Any) -> Callable[[torch.Tensor, torch.Tensor], dict[str, float]]:
    """The reference implementation's `CycleGANModel.optimize_parameters`, re-written plainly in eager
    PyTorch over the same four networks: one Adam over both generators (itertools.chain) and one over
    both discriminators, D frozen by requires_grad during the G step, two D backwards."""
    from gannet.models.recipes.cyclegan import ImagePool

    G_A, G_B, D_A, D_B = nets["G"]["AB"], nets["G"]["BA"], nets["D"]["B"], nets["D"]["A"]  # reference names
    opt_G = torch.optim.Adam(itertools.chain(G_A.parameters(), G_B.parameters()), lr=optim.g.lr, betas=optim.g.betas)
    opt_D = torch.optim.Adam(itertools.chain(D_A.parameters(), D_B.parameters()), lr=optim.d.lr, betas=optim.d.betas)
    pool_A, pool_B = ImagePool(params.pool_size), ImagePool(params.pool_size)
    mse, l1 = torch.nn.MSELoss(), torch.nn.L1Loss()
    lambda_A, lambda_B, lambda_idt = params.lambda_a, params.lambda_b, params.lambda_identity

    def gan_loss(pred: torch.Tensor, real: bool) -> torch.Tensor:
        return mse(pred, torch.tensor(1.0 if real else 0.0, device=pred.device).expand_as(pred))

    def backward_D_basic(netD: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        loss_D = (gan_loss(netD(real), True) + gan_loss(netD(fake.detach()), False)) * 0.5
        loss_D.backward()
        return loss_D

    def step(real_A: torch.Tensor, real_B: torch.Tensor) -> dict[str, float]:
        fake_B = G_A(real_A)
        rec_A = G_B(fake_B)
        fake_A = G_B(real_B)
        rec_B = G_A(fake_A)
        for net in (D_A, D_B):
            net.requires_grad_(False)
        opt_G.zero_grad()
        loss_idt_A = l1(G_A(real_B), real_B) * lambda_B * lambda_idt
        loss_idt_B = l1(G_B(real_A), real_A) * lambda_A * lambda_idt
        loss_G = (gan_loss(D_A(fake_B), True) + gan_loss(D_B(fake_A), True) + l1(rec_A, real_A) * lambda_A
                  + l1(rec_B, real_B) * lambda_B + loss_idt_A + loss_idt_B)
        loss_G.backward()
        opt_G.step()
        for net in (D_A, D_B):
            net.requires_grad_(True)
        opt_D.zero_grad()
        loss_D_A = backward_D_basic(D_A, real_B, pool_B.query(fake_B))
        loss_D_B = backward_D_basic(D_B, real_A, pool_A.query(fake_A))
        opt_D.step()
        return {"loss_g": loss_G.item(), "loss_d": loss_D_A.item() + loss_D_B.item()}

    return step


def interleaved(steps: dict[str, Callable[[], dict[str, float]]], n: int,
                device: torch.device) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Seconds per call of each step function, timed in turns (A, B, A, B, ...) so that both see the
    same machine load, after one warm-up call each; and the warm-up calls' losses (the first step's)."""
    first = {name: step() for name, step in steps.items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return times, first


def cyclegan_step_bench(config: str, overrides: list[str], *, steps: int, out: Path) -> dict[str, Any]:
    """One process: gannet's CycleGAN iteration on its engine vs the plain eager reference step, on
    the same device, the same initial weights and the same in-memory batches (data loading excluded
    from both). Both first steps see identical inputs, so their losses must agree: the check that
    the two compute the same thing."""
    cfg = load_config(config, overrides)
    job = setup(cfg)
    engine, recipe = job.engine, job.recipe
    torch.manual_seed(cfg.seed)
    reference_nets = {name: net.to(engine.device) for name, net in recipe.build().items()}  # the same initial weights
    shape = (cfg.data.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    batches = [(torch.rand(shape, generator=torch.Generator().manual_seed(i)) * 2 - 1).to(engine.device) for i in range(4)]

    def batch_stream() -> Iterator[dict[str, torch.Tensor]]:
        for i in itertools.count():
            yield {"image": batches[i % 4], "image_b": batches[(i + 1) % 4]}

    engine.data = batch_stream()
    reference = reference_cyclegan_step(reference_nets, cfg.optim, cfg.recipe)
    ref_calls = itertools.count()

    def reference_step() -> dict[str, float]:
        i = next(ref_calls)
        return reference(batches[i % 4], batches[(i + 1) % 4])

    times, first = interleaved({"gannet": lambda: {k: v.item() for k, v in recipe.iteration(engine).items()},
                                "reference": reference_step}, steps, engine.device)
    ours, theirs, ours_first, theirs_first = times["gannet"], times["reference"], first["gannet"], first["reference"]
    params = {name: sum(p.numel() for p in engine.module(name).parameters()) for name in ("G", "D")}
    engine.close()  # releases the networks: count them first
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    device = torch.cuda.get_device_name() if engine.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    result = {
        "config": config, "overrides": overrides, "device": device, "image_size": cfg.data.image_size,
        "batch_size": cfg.data.batch_size, "steps_timed": steps,
        "params": params,
        "gannet_ms": 1000 * median(ours), "reference_ms": 1000 * median(theirs),
        "first_step_losses": {"gannet": {k: ours_first[k] for k in ("loss_g", "loss_d")}, "reference": theirs_first},
    }
    result["ratio"] = result["gannet_ms"] / result["reference_ms"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"gannet bench step: {config} {' '.join(overrides)} on {device}\n"
          f"CycleGAN training step, {cfg.data.image_size} px, batch {cfg.data.batch_size} "
          f"(G pair {result['params']['G']:,} and D pair {result['params']['D']:,} parameters), median of {steps}:\n"
          f"  gannet (recipe on the engine) {result['gannet_ms']:9.1f} ms\n"
          f"  reference (plain eager)       {result['reference_ms']:9.1f} ms\n"
          f"  ratio gannet/reference        {result['ratio']:9.3f}\n"
          f"  first-step losses: gannet G {ours_first['loss_g']:.6f} D {ours_first['loss_d']:.6f}, "
          f"reference G {theirs_first['loss_g']:.6f} D {theirs_first['loss_d']:.6f}")
    return result
