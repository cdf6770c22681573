"""The training loop: `train` is a skeleton of named phases, read top to bottom.

    run directory -> setup (engine, recipe, networks, optimizers) -> resume -> data stream
    -> steps (iterate, log, sample, evaluate, checkpoint) -> close

Every rank runs this same function; rank 0 alone writes logs, samples and shared checkpoint
files. What a training iteration does is the recipe's business (gannet.models.recipes); how gradients
move between processes is the engine's (gannet.trainer.engine.distributed).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from gannet.trainer.checkpoint.store import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from gannet.trainer.config.loader import config_to_dict
from gannet.trainer.config.schema import Config
from gannet.trainer.data.stream import ShardExamples, open_stream, stream_urls
from gannet.trainer.engine import fast, preemption
from gannet.trainer.engine.distributed import Engine
from gannet.trainer.engine.setup import CosineSchedule, Job, setup
from gannet.trainer.errors import ConfigError, GannetError
from gannet.trainer.evaluation.evaluate import Evaluator
from gannet.trainer.evaluation.images import grid_array, save_grid
from gannet.trainer.tracking.tracker import Tracker

log = logging.getLogger("gannet")


def train(cfg: Config) -> Path:
    """Train `cfg` to `cfg.train.steps` generator steps, resuming its run directory if asked."""
    shard_urls = stream_urls(cfg.data)  # a wrong path fails here, before any process group
    resume_from = resume_point(cfg)
    job = setup(cfg, ShardExamples(cfg))
    engine, recipe = job.engine, job.recipe
    open_run_dir(cfg, engine)
    if engine.is_main:
        log.info(engine.fast.describe())  # what `auto` chose on this device, and why
    grid = fixed_grid(cfg, job)
    step, data_state = restore(cfg, job, resume_from)
    engine.data = open_stream(shard_urls, cfg.data, rank=engine.rank, world=engine.world, seed=cfg.seed, state=data_state)
    tracker = Tracker(cfg.run_path, cfg, enabled=engine.is_main, start_step=step)
    evaluator = Evaluator(cfg) if cfg.eval.every and engine.is_main else None  # real-data features, once
    if step >= cfg.train.steps:
        log.info("%s is already at step %d of %d: nothing to do", cfg.run_path, step, cfg.train.steps)

    meter, watch = Throughput(cfg.images_per_step(engine.world), step), NonfiniteWatch()
    while step < cfg.train.steps:
        metrics = recipe.iteration(engine)
        for scheduler in job.schedulers.values():
            scheduler.step()
        step += 1
        tracker.advance()
        if watch.streak(engine) >= cfg.train.max_nonfinite:  # diverged: back to the last good checkpoint, or stop
            step = roll_back(cfg, job, tracker, watch, step, shard_urls)
            meter = Throughput(cfg.images_per_step(engine.world), step)
            continue
        last = step == cfg.train.steps
        if step % cfg.train.log_every == 0 or last:
            log_metrics(job, tracker, step, metrics, meter)
            report_compile(job)
        if step % cfg.train.sample_every == 0 or last:
            write_samples(cfg, job, tracker, step, grid)
        if cfg.eval.every and step % cfg.eval.every == 0:
            evaluate_now(cfg, job, tracker, evaluator, step)
        # Slurm's warning signal (time limit, preemption): all ranks save this step and stop; the launcher requeues.
        stop = step % cfg.train.log_every == 0 and preemption.agreed(engine)
        if step % cfg.train.checkpoint_every == 0 or last or stop:
            save(cfg, job, step)
        if stop and not last:
            log.info("stopped at step %d for the cluster (time limit or preemption); resume=auto continues", step)
            break

    tracker.finish()  # flush the dashboard, then leave the process group cleanly
    engine.close()
    if engine.is_main:
        log.info("finished %s at step %d; samples in %s", cfg.run_path, step, cfg.run_path / "samples")
    return cfg.run_path


# -- before the loop -------------------------------------------------------------------------------

def resume_point(cfg: Config) -> Path | None:
    """The checkpoint to continue from (resume=auto), or None; refuses to overwrite a run by accident."""
    latest = latest_checkpoint(cfg.run_path)
    if cfg.resume == "never" and latest is not None:
        raise ConfigError(
            f"{cfg.run_path} already holds checkpoints (latest {latest.name}); add resume=auto to "
            f"continue it, or choose another run_dir=... or name=..."
        )
    return latest if cfg.resume == "auto" else None


def open_run_dir(cfg: Config, engine: Engine) -> None:
    """Rank 0 writes the resolved config and starts the log file; the others wait for it."""
    if engine.is_main:
        cfg.run_path.mkdir(parents=True, exist_ok=True)
        (cfg.run_path / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        handler = logging.FileHandler(cfg.run_path / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("gannet").addHandler(handler)
    engine.barrier()


def fixed_grid(cfg: Config, job: Job) -> dict[str, Any]:
    """The inputs behind every sample grid of the run (drawn once from its seed), and what each
    sample is asked to show (conditional GANs), written to samples/prompts.txt."""
    inputs = job.recipe.fixed_inputs(cfg.train.num_samples, torch.Generator().manual_seed(cfg.seed))
    prompts = job.recipe.captions(inputs)
    if prompts and job.engine.is_main:
        (cfg.run_path / "samples").mkdir(exist_ok=True)
        (cfg.run_path / "samples" / "prompts.txt").write_text("".join(f"{text}\n" for text in prompts))
    return {"inputs": inputs, "prompts": prompts}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def restore(cfg: Config, job: Job, checkpoint: Path | None) -> tuple[int, dict | None]:
    """Seed each rank apart (each draws its own noise), then restore everything a checkpoint holds.
    Returns the step to continue from and this rank's data-stream position (None = from the start)."""
    engine = job.engine
    seed_everything(cfg.seed + 1000 * engine.rank)
    if checkpoint is None:
        return 0, None
    weights, shared, own = load_checkpoint(checkpoint, engine.rank)
    engine.load_state(checkpoint, shared["engine"], weights)
    for name, scheduler in job.schedulers.items():
        scheduler.load_state_dict(shared["schedulers"][name])
    step, data_state = shared["step"], None
    if own is not None and shared["world"] == engine.world:
        set_rng_state(own["rng"])
        data_state = own["data"]
        job.recipe.load_state_dict(own["recipe"])
    else:
        log.warning("resuming on %d processes from a %d-process checkpoint: models and optimizers are restored "
                    "exactly, the data stream, noise and recipe state (e.g. image pools) restart afresh",
                    engine.world, shared["world"])
        seed_everything(cfg.seed + 1000 * engine.rank + step)
    log.info("resumed %s at step %d", checkpoint, step)
    return step, data_state


# -- inside the loop -------------------------------------------------------------------------------

class Throughput:
    """Images per second since the last logged step."""

    def __init__(self, images_per_step: int, step: int):
        self.images_per_step, self.step, self.clock = images_per_step, step, time.perf_counter()

    def images_per_s(self, step: int) -> float:
        now = time.perf_counter()
        rate = self.images_per_step * (step - self.step) / max(now - self.clock, 1e-9)
        self.step, self.clock = step, now
        return rate


def log_metrics(job: Job, tracker: Tracker, step: int, metrics: dict[str, torch.Tensor], meter: Throughput) -> None:
    """Scalars averaged over ranks as train/<key>; batch-shaped values (rank 0's) as histograms."""
    engine = job.engine
    names = sorted(k for k, v in metrics.items() if v.ndim == 0)
    values = engine.mean(torch.stack([metrics[k].float() for k in names])).tolist()
    record = {f"train/{k}": v for k, v in zip(names, values)}
    record.update({f"train/lr_{name.lower()}": s.get_last_lr()[0] for name, s in job.schedulers.items()})
    record.update({f"train/beta2_{name.lower()}": s.beta2_at(s.last_epoch) for name, s in job.schedulers.items()
                   if isinstance(s, CosineSchedule)})  # R3GAN's cosine moves Adam's beta2 too
    record["data/skipped"] = float(engine.data.position.errors)
    record["data/retries"] = float(engine.data.position.retries)  # remote shards: transient failures retried
    record["train/nonfinite_steps"] = float(engine.nonfinite_steps)
    record["perf/images_per_s"] = meter.images_per_s(step)
    tracker.log(step, record, histograms={f"train/{k}": v.float().cpu() for k, v in metrics.items() if v.ndim > 0})


def report_compile(job: Job) -> None:
    """torch.compile's graphs, graph breaks and recompiles, logged at a logging step whenever they
    changed since the last report: once in a healthy run, never silently."""
    if not (job.engine.fast.compile and job.engine.is_main):
        return
    report = fast.compile_report(len(job.engine.optimizers))  # the optimised networks are the compiled ones
    if report != job.engine.fast.compile_reported:
        log.info(report)
        job.engine.fast.compile_reported = report


def write_samples(cfg: Config, job: Job, tracker: Tracker, step: int, grid: dict[str, Any]) -> None:
    """The fixed-input grid as samples/step-N.png (and W&B), with the prompts table beside it."""
    images = generate_samples(job, grid["inputs"])
    if not job.engine.is_main:
        return
    path = save_grid(images, cfg.run_path / "samples" / f"step-{step:08d}.png")
    tracker.log_image(step, "samples/fixed_noise", path)
    if grid["prompts"]:  # the first 16 samples beside their prompts, as a W&B table
        tracker.log_table(step, "samples/prompts", ["prompt", "sample"],
                          [[text, grid_array(image[None], nrow=1, pad=0)] for text, image in zip(grid["prompts"][:16], images)])


def evaluate_now(cfg: Config, job: Job, tracker: Tracker, evaluator: Evaluator | None, step: int) -> None:
    """Each rank generates its share of eval.samples; rank 0 scores them all."""
    engine = job.engine
    share = -(-cfg.eval.samples // engine.world)
    noise = torch.Generator().manual_seed(cfg.seed + 7919 * step + engine.rank)  # apart from the training RNG
    inputs = job.recipe.fixed_inputs(share, noise)
    images = engine.gather(generate_samples(job, inputs).float())
    labels = engine.gather(inputs["label"].to(engine.device)) if "label" in inputs else None
    if evaluator is not None:
        scores = evaluator.score(images[: cfg.eval.samples].cpu(), None if labels is None else labels[: cfg.eval.samples].cpu())
        tracker.log(step, Evaluator.scalars(scores))


class NonfiniteWatch:
    """Counts consecutive iterations in which an optimizer step was skipped (a non-finite loss or
    gradient on some rank: the engine skips such steps on every rank, leaving weights untouched),
    and remembers the checkpoints already rolled back to."""

    def __init__(self) -> None:
        self.seen, self.count, self.rolled_back = 0, 0, set()

    def streak(self, engine: Engine) -> int:
        self.count = self.count + 1 if engine.nonfinite_steps > self.seen else 0
        self.seen = engine.nonfinite_steps
        return self.count


def roll_back(cfg: Config, job: Job, tracker: Tracker, watch: NonfiniteWatch, step: int, shard_urls: list[list[str]]) -> int:
    """After train.max_nonfinite bad steps in a row: restore the latest checkpoint (weights,
    optimizers, schedules, RNG, data position) with learning rates x train.rollback_lr_factor, and
    continue from its step. Stops with one line when told to, with nothing to roll back to, or when
    the same checkpoint diverged again."""
    engine, checkpoint = job.engine, latest_checkpoint(cfg.run_path)
    what = (f"training diverged: {cfg.train.max_nonfinite} steps in a row with a non-finite loss or gradient, "
            f"up to step {step} (their updates were skipped: no weight holds a non-finite value)")
    if cfg.train.on_nonfinite == "stop" or checkpoint is None or checkpoint in watch.rolled_back:
        why = ("train.on_nonfinite=stop" if cfg.train.on_nonfinite == "stop" else "no checkpoint to roll back to"
               if checkpoint is None else f"it diverged again after rolling back to {checkpoint.name}")
        raise GannetError(f"{what}; stopped: {why}. Lower optim.g.lr/optim.d.lr or check the data, then resume=auto")
    watch.rolled_back.add(checkpoint)
    back, data_state = restore(cfg, job, checkpoint)
    for scheduler in job.schedulers.values():  # LambdaLR: lr = base_lr * factor(step); scale the base
        scheduler.base_lrs = [lr * cfg.train.rollback_lr_factor for lr in scheduler.base_lrs]
        for group in scheduler.optimizer.param_groups:
            group["lr"] *= cfg.train.rollback_lr_factor
    engine.data = open_stream(shard_urls, cfg.data, rank=engine.rank, world=engine.world, seed=cfg.seed, state=data_state)
    engine.skipped.clear()
    watch.count = 0
    tracker.rewind(back)
    log.warning("%s; rolled back to %s (step %d), learning rates x%g", what, checkpoint.name, back, cfg.train.rollback_lr_factor)
    return back


def save(cfg: Config, job: Job, step: int) -> None:
    """A checkpoint of everything exact resume needs (all ranks take part)."""
    engine = job.engine
    save_checkpoint(
        cfg.run_path, step, rank=engine.rank, barrier=engine.barrier, keep=cfg.train.keep_checkpoints,
        weights=engine.full_weights(), write_files=engine.save_files, first_error=engine.first_error,
        shared={
            "step": step, "world": engine.world, "networks": list(engine.nets),
            "engine": engine.state_dict(),
            "schedulers": {name: s.state_dict() for name, s in job.schedulers.items()},
        },
        per_rank={"rng": rng_state(), "data": engine.data.position.state_dict(), "recipe": job.recipe.state_dict()},
    )


def generate_samples(job: Job, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Images from given inputs (the fixed grid, eval samples). Every rank runs it (sharded models
    need all ranks in a forward); networks go to eval mode, so sampling leaves BatchNorm statistics
    and RNG streams untouched."""
    engine = job.engine
    for net in engine.nets.values():
        net.eval()
    with torch.no_grad():
        images = job.recipe.generate(engine.nets, engine.inputs(inputs))
    for net in engine.nets.values():
        net.train()
    return images
