"""The training loop: one function, read top to bottom.

    run directory -> networks + optimizers -> engine -> (resume) -> data stream -> steps -> close

Every rank runs this same function; rank 0 alone writes logs, samples and shared checkpoint
files. What a training iteration does is the recipe's business (models.recipes); how gradients
move between processes is the engine's (trainer.engine).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from models.recipes import get_recipe
from trainer import preemption
from trainer.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from trainer.config import Config, OptimConfig, config_to_dict
from trainer.data import example_images, open_stream, stream_urls
from trainer.engine import Engine, make_engine
from trainer.errors import ConfigError
from trainer.evaluate import Evaluator
from trainer.images import grid_array, save_grid
from trainer.tracking import Tracker

log = logging.getLogger("gannet")


def lr_factor(opt: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """Constant, or constant until `decay_from` and then linear to zero at the last step."""
    if opt.schedule == "constant":
        return lambda step: 1.0
    span = total_steps - opt.decay_from
    return lambda step: 1.0 - max(0, step - opt.decay_from) / span


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg: Config) -> Path:
    """Train `cfg` to `cfg.train.steps` generator steps, resuming its run directory if asked."""
    run_dir = cfg.run_path
    shard_urls = stream_urls(cfg.data)  # a wrong path fails here, before any process group
    engine = make_engine(cfg)

    # 1. The run directory: refuse to overwrite a run by accident; find the resume point.
    latest = latest_checkpoint(run_dir)
    if cfg.resume == "never" and latest is not None:
        raise ConfigError(
            f"{run_dir} already holds checkpoints (latest {latest.name}); add resume=auto to "
            f"continue it, or choose another run_dir=... or name=..."
        )
    resume_from = latest if cfg.resume == "auto" else None
    if engine.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("gannet").addHandler(handler)
    engine.barrier()

    # 2. Networks and optimizers, initialised identically on every rank from the run's seed.
    torch.manual_seed(cfg.seed)
    recipe = get_recipe(cfg.recipe.name)(cfg.recipe, cfg)
    nets = recipe.build()
    opt_cfg = engine.optim_config
    optimizers = {
        name: torch.optim.Adam(net.parameters(), lr=opt_cfg(name).lr, betas=opt_cfg(name).betas,
                               weight_decay=opt_cfg(name).weight_decay)
        for name, net in nets.items()
    }
    schedulers = {
        name: torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(opt_cfg(name), cfg.train.steps))
        for name, opt in optimizers.items()
    }
    engine.prepare(nets, optimizers)
    fixed_inputs = recipe.fixed_inputs(cfg.train.num_samples, torch.Generator().manual_seed(cfg.seed),
                                       examples=lambda n: example_images(shard_urls, cfg.data, n))
    prompts = recipe.captions(fixed_inputs)  # conditional GANs: what each grid sample is asked to show
    if prompts and engine.is_main:
        (run_dir / "samples").mkdir(exist_ok=True)
        (run_dir / "samples" / "prompts.txt").write_text("".join(f"{text}\n" for text in prompts))

    # 3. Randomness differs per rank (each draws its own noise); then restore everything saved.
    seed_everything(cfg.seed + 1000 * engine.rank)
    step, data_state = 0, None
    if resume_from is not None:
        weights, shared, own = load_checkpoint(resume_from, engine.rank)
        engine.load_state(resume_from, shared["engine"], weights)
        for name, scheduler in schedulers.items():
            scheduler.load_state_dict(shared["schedulers"][name])
        step = shared["step"]
        if own is not None and shared["world"] == engine.world:
            set_rng_state(own["rng"])
            data_state = own["data"]
            recipe.load_state_dict(own["recipe"])
        else:
            log.warning("resuming on %d processes from a %d-process checkpoint: models and optimizers are restored "
                        "exactly, the data stream, noise and recipe state (e.g. image pools) restart afresh",
                        engine.world, shared["world"])
            seed_everything(cfg.seed + 1000 * engine.rank + step)
        log.info("resumed %s at step %d", resume_from, step)
    engine.data = open_stream(shard_urls, cfg.data, rank=engine.rank, world=engine.world, seed=cfg.seed, state=data_state)
    tracker = Tracker(run_dir, cfg, enabled=engine.is_main, start_step=step)
    evaluator = Evaluator(cfg) if cfg.eval.every and engine.is_main else None  # real-data features, once
    if step >= cfg.train.steps:
        log.info("%s is already at step %d of %d: nothing to do", run_dir, step, cfg.train.steps)

    # 4. The loop: one recipe iteration per step; log, sample and checkpoint on their schedules.
    images_per_step = cfg.images_per_step(engine.world)
    clock, clock_step = time.perf_counter(), step
    while step < cfg.train.steps:
        metrics = recipe.iteration(engine)
        for scheduler in schedulers.values():
            scheduler.step()
        step += 1
        tracker.advance()
        last = step == cfg.train.steps

        if step % cfg.train.log_every == 0 or last:
            names = sorted(k for k, v in metrics.items() if v.ndim == 0)  # batch-shaped values: histograms
            values = engine.accelerator.reduce(torch.stack([metrics[k].float() for k in names]), "mean").tolist()
            elapsed = time.perf_counter() - clock
            record = {f"train/{k}": v for k, v in zip(names, values)}
            record.update({f"train/lr_{name.lower()}": s.get_last_lr()[0] for name, s in schedulers.items()})
            record["data/skipped"] = float(engine.data.position.errors)
            record["perf/images_per_s"] = images_per_step * (step - clock_step) / max(elapsed, 1e-9)
            tracker.log(step, record, histograms={f"train/{k}": v.float().cpu() for k, v in metrics.items() if v.ndim > 0})
            clock, clock_step = time.perf_counter(), step

        if step % cfg.train.sample_every == 0 or last:
            images = generate_samples(engine, recipe, fixed_inputs)
            if engine.is_main:
                path = save_grid(images, run_dir / "samples" / f"step-{step:08d}.png")
                tracker.log_image(step, "samples/fixed_noise", path)
                if prompts:  # the first 16 samples beside their prompts, as a W&B table
                    tracker.log_table(step, "samples/prompts", ["prompt", "sample"],
                                      [[text, grid_array(image[None], nrow=1, pad=0)] for text, image in zip(prompts[:16], images)])

        if cfg.eval.every and step % cfg.eval.every == 0:
            share = -(-cfg.eval.samples // engine.world)  # each rank generates its share; rank 0 scores all
            noise = torch.Generator().manual_seed(cfg.seed + 7919 * step + engine.rank)  # apart from the training RNG
            inputs = recipe.fixed_inputs(share, noise)
            images = engine.accelerator.gather(generate_samples(engine, recipe, inputs).float())
            labels = engine.accelerator.gather(inputs["label"].to(engine.device)) if "label" in inputs else None
            if evaluator is not None:
                scores = evaluator.score(images[: cfg.eval.samples].cpu(), None if labels is None else labels[: cfg.eval.samples].cpu())
                tracker.log(step, Evaluator.scalars(scores))

        # Slurm's warning signal (time limit, preemption): all ranks save this step and stop; the launcher requeues.
        stop = step % cfg.train.log_every == 0 and preemption.agreed(engine)
        if step % cfg.train.checkpoint_every == 0 or last or stop:
            save_checkpoint(
                run_dir, step, rank=engine.rank, barrier=engine.barrier, keep=cfg.train.keep_checkpoints,
                weights=engine.full_weights(), write_files=engine.save_files,
                shared={
                    "step": step, "world": engine.world, "networks": list(engine.nets),
                    "engine": engine.state_dict(),
                    "schedulers": {name: s.state_dict() for name, s in schedulers.items()},
                },
                per_rank={"rng": rng_state(), "data": engine.data.position.state_dict(), "recipe": recipe.state_dict()},
            )
        if stop and not last:
            log.info("stopped at step %d for the cluster (time limit or preemption); resume=auto continues", step)
            break

    # 5. Done: flush the dashboard, leave the process group cleanly.
    tracker.finish()
    engine.close()
    if engine.is_main:
        log.info("finished %s at step %d; samples in %s", run_dir, step, run_dir / "samples")
    return run_dir


def generate_samples(engine: Engine, recipe, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Images from given inputs (the fixed-noise grid, eval samples). Every rank runs it (sharded
    models need all ranks in a forward); networks go to eval mode, so sampling leaves BatchNorm
    statistics and RNG streams untouched."""
    for net in engine.nets.values():
        net.eval()
    with torch.no_grad():
        images = recipe.generate(engine.nets, engine.inputs(inputs))
    for net in engine.nets.values():
        net.train()
    return images
