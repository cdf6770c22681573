"""The training loop: `train` is a skeleton of named phases, read top to bottom.

    run directory -> setup (engine, recipe, networks, optimizers) -> resume -> data stream
    -> steps (iterate, watch, log, sample, evaluate, checkpoint; roll back if diverged) -> close

Every rank runs this same function; rank 0 alone writes logs, samples and shared checkpoint
files. What a training iteration does is the recipe's business (gannet.models.recipes); how gradients
move between processes is the engine's (gannet.trainer.engine.distributed).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate.utils import set_seed

from gannet.trainer.checkpoint.store import (
    NonfiniteCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from gannet.trainer.config.loader import config_from_dict, config_to_dict
from gannet.trainer.config.resume import check_resumable
from gannet.trainer.config.schema import Config
from gannet.trainer.data.stream import ShardExamples, open_stream, stream_urls
from gannet.trainer.engine import fast, preemption
from gannet.trainer.engine.distributed import Engine
from gannet.trainer.engine.setup import CosineSchedule, Job, setup
from gannet.trainer.errors import ConfigError, GannetError
from gannet.trainer.evaluation.evaluate import Evaluator
from gannet.trainer.evaluation.images import grid_array, save_grid
from gannet.trainer.guard import Divergence, Watch
from gannet.trainer.tracking.tracker import Tracker

log = logging.getLogger("gannet")


def train(cfg: Config) -> Path:
    """Train `cfg` to `cfg.train.steps` generator steps, resuming its run directory if asked."""
    shard_urls = stream_urls(cfg.data)  # a wrong path fails here, before any process group
    resume_from = resume_point(cfg)
    job = setup(cfg, ShardExamples(cfg))
    engine = job.engine
    open_run_dir(cfg, engine)
    if engine.is_main:
        log.info(engine.fast.describe())  # what `auto` chose on this device, and why
    grid = fixed_grid(cfg, job)
    watch = Watch(cfg.train, speaks=engine.is_main)  # skipped (non-finite) steps and loss spikes: when to roll back
    step, data_state = restore(cfg, job, watch, resume_from)
    engine.data = open_stream(shard_urls, cfg.data, rank=engine.rank, world=engine.world, seed=cfg.seed, state=data_state)
    tracker = Tracker(cfg.run_path, cfg, enabled=engine.is_main, start_step=step)
    evaluator = Evaluator(cfg) if cfg.eval.every and engine.is_main else None  # real-data features, once
    if step >= cfg.train.steps:
        log.info("%s is already at step %d of %d: nothing to do", cfg.run_path, step, cfg.train.steps)

    meter = Throughput(cfg.images_per_step(engine.world), step)
    while step < cfg.train.steps:
        metrics = job.recipe.iteration(job.engine)
        for scheduler in job.schedulers.values():
            scheduler.step()
        step += 1
        tracker.advance()
        scalars = step_scalars(job.engine, metrics)  # averaged over ranks: what the watch judges and the logs show
        diverged, last, stop = watch.observe(step, scalars, job.engine.nonfinite_steps), step == cfg.train.steps, False
        if diverged is None:
            if step % cfg.train.log_every == 0 or last:
                log_metrics(job, tracker, step, scalars, metrics, meter, watch)
                report_compile(job)
            if step % cfg.train.sample_every == 0 or last:
                write_samples(cfg, job, tracker, step, grid)
            if cfg.eval.every and step % cfg.eval.every == 0:
                evaluate_now(cfg, job, tracker, evaluator, step)
            # Slurm's warning signal (time limit, preemption): all ranks save this step and stop; the launcher requeues.
            stop = step % cfg.train.log_every == 0 and preemption.agreed(job.engine)
            if step % cfg.train.checkpoint_every == 0 or last or stop:
                diverged = save(cfg, job, watch, step)  # a state holding NaN or Inf is not kept: diverged too
        if diverged is not None:  # back to the last good checkpoint (or the start), or stop
            job, step = roll_back(cfg, job, tracker, watch, step, shard_urls, diverged)
            meter = Throughput(cfg.images_per_step(job.engine.world), step)
            continue
        if stop and not last:
            log.info("stopped at step %d for the cluster (time limit or preemption); resume=auto continues", step)
            break

    tracker.finish()  # flush the dashboard, then leave the process groups cleanly
    engine = job.engine
    job.close()
    if engine.is_main:
        log.info("finished %s at step %d; samples in %s", cfg.run_path, step, cfg.run_path / "samples")
    return cfg.run_path


# -- before the loop -------------------------------------------------------------------------------

def resume_point(cfg: Config) -> Path | None:
    """The checkpoint to continue from (resume=auto), or None; refuses to overwrite a run by accident,
    and to continue one under a config that changes what its checkpoints were trained with."""
    latest = latest_checkpoint(cfg.run_path)
    if cfg.resume == "never" and latest is not None:
        raise ConfigError(
            f"{cfg.run_path} already holds checkpoints (latest {latest.name}); add resume=auto to "
            f"continue it, or choose another run_dir=... or name=..."
        )
    if cfg.resume == "auto" and latest is not None and (cfg.run_path / "config.yaml").is_file():
        check_resumable(saved_config(cfg.run_path / "config.yaml"), config_to_dict(cfg), str(cfg.run_path))
    return latest if cfg.resume == "auto" else None


def saved_config(path: Path) -> dict[str, Any]:
    """A run's config.yaml as plain data, with today's defaults filled in where it loads (a run from
    an older gannet may not: then as written)."""
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return config_to_dict(config_from_dict(raw))
    except ConfigError:
        return raw


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
    """Python's, NumPy's and torch's RNGs (every device's) through Accelerate's `set_seed`; NumPy takes
    seeds below 2**32 only, so a larger or negative `seed` is folded into that range for all three."""
    set_seed(seed % 2**32)


def restore(cfg: Config, job: Job, watch: Watch, checkpoint: Path | None) -> tuple[int, dict | None]:
    """Seed each rank apart (each draws its own noise), then restore everything a checkpoint holds.
    Returns the step to continue from and this rank's data-stream position (None = from the start)."""
    engine = job.engine
    seed_everything(cfg.seed + 1000 * engine.rank)
    if checkpoint is None:
        watch.load_state_dict(None)
        return 0, None
    weights, shared, own = load_checkpoint(checkpoint, engine.rank)
    engine.load_state(checkpoint, shared["engine"], weights)
    watch.load_state_dict(shared.get("guard"))  # the spike detector's history (checkpoints before it have none)
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


def step_scalars(engine: Engine, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """A step's scalar metrics averaged over ranks (one all-reduce): every rank judges the same values."""
    names = sorted(k for k, v in metrics.items() if v.ndim == 0)
    return dict(zip(names, engine.mean(torch.stack([metrics[k].float() for k in names])).tolist()))


def log_metrics(job: Job, tracker: Tracker, step: int, scalars: dict[str, float], metrics: dict[str, torch.Tensor],
                meter: Throughput, watch: Watch) -> None:
    """Scalars averaged over ranks as train/<key>; batch-shaped values (rank 0's) as histograms."""
    engine = job.engine
    record = {f"train/{k}": v for k, v in scalars.items()}
    record.update({f"train/lr_{name.lower()}": s.get_last_lr()[0] for name, s in job.schedulers.items()})
    record.update({f"train/beta2_{name.lower()}": s.beta2_at(s.last_epoch) for name, s in job.schedulers.items()
                   if isinstance(s, CosineSchedule)})  # R3GAN's cosine moves Adam's beta2 too
    record["data/skipped"] = float(engine.data.position.errors)
    record["data/retries"] = float(engine.data.position.retries)  # remote shards: transient failures retried
    record["train/nonfinite_steps"] = float(engine.nonfinite_steps)
    if hasattr(engine.data, "meter"):  # how long steps waited for data, what the loader can deliver (mean over ranks)
        loader = engine.data.meter.take(step - meter.step)
        record.update(zip(loader, engine.mean(torch.tensor(list(loader.values()), device=engine.device)).tolist()))
    record["train/spikes"], record["train/rollbacks"] = float(watch.spikes), float(watch.rollbacks)
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


def roll_back(cfg: Config, job: Job, tracker: Tracker, watch: Watch, step: int, shard_urls: list[list[str]],
              diverged: Divergence) -> tuple[Job, int]:
    """After a divergence (`Watch.observe`, or a state that could not be saved): restore the latest
    verified checkpoint (weights, optimizers, schedules, RNG, data position, the spike detector's
    history), or with none yet start over from the seed, with learning rates x
    train.rollback_lr_factor, and continue from its step (train.rollback_skip: past the batches
    that led there). Stops with one line when told to, or when train.max_rollbacks did not help."""
    what = f"training diverged: {diverged.what}"
    why = watch.give_up(diverged)
    if why:
        raise GannetError(f"{what}; stopped: {why}. Lower optim.g.lr/optim.d.lr or check the data, then resume=auto")
    factor = cfg.train.rollback_lr_factor
    lrs = {name: [lr * factor for lr in scheduler.base_lrs] for name, scheduler in job.schedulers.items()}
    checkpoint = latest_checkpoint(cfg.run_path)
    if checkpoint is None:
        job = restart(cfg, job)
    back, data_state = restore(cfg, job, watch, checkpoint)
    set_learning_rates(job, lrs)
    engine = job.engine
    engine.data = open_stream(shard_urls, cfg.data, rank=engine.rank, world=engine.world, seed=cfg.seed, state=data_state)
    skipped = skip_batches(cfg, engine, step - back) if cfg.train.rollback_skip else 0
    engine.skipped.clear()
    tracker.rewind(back)
    watch.rolled_back(checkpoint.name if checkpoint else "the start")
    if engine.is_main:
        log.warning("%s; rolled back to %s (step %d), learning rates x%g%s", what, watch.last_target, back, factor,
                    f", {skipped} batches skipped" if skipped else "")
    return job, back


def restart(cfg: Config, job: Job) -> Job:
    """A divergence before the first checkpoint: the job is built afresh from the run's seed (the
    initial weights, fresh optimizers and schedules), as the run began: the start is the checkpoint."""
    examples, nonfinite = job.recipe.examples, job.engine.nonfinite_steps
    fresh = setup(cfg, examples)
    fresh.engine.nonfinite_steps = nonfinite  # the count of the run, not of this build
    return fresh


def set_learning_rates(job: Job, base_lrs: dict[str, list[float]]) -> None:
    """New base learning rates, in force from the current step (LambdaLR: lr = base x factor(step))."""
    for name, scheduler in job.schedulers.items():
        scheduler.base_lrs = base_lrs[name]
        lrs = [base * factor(scheduler.last_epoch) for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
        for group, lr in zip(scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs  # what get_last_lr() (train/lr_*) reports until the next step


def skip_batches(cfg: Config, engine: Engine, steps: int) -> int:
    """Draw and drop the batches `steps` generator steps take on this rank (the ones that led to a
    divergence), so the steps after a rollback see other data."""
    batches = steps * cfg.recipe.batches_per_step * cfg.train.grad_accum
    for _ in range(batches):
        next(engine.data)
    return batches


def save(cfg: Config, job: Job, watch: Watch, step: int) -> Divergence | None:
    """A checkpoint of everything exact resume needs (all ranks take part), but none at a step whose
    losses spike or whose update was skipped (a rollback must find the state before). A state that holds NaN or Inf
    is never written: that is a divergence, returned for the loop to roll back."""
    engine = job.engine
    if not watch.calm:
        if engine.is_main:
            log.warning("no checkpoint at step %d: its losses spike or its update was skipped (a rollback goes to the "
                        "state before)", step)
        return None
    try:
        save_checkpoint(
            cfg.run_path, step, rank=engine.rank, barrier=engine.barrier, keep=cfg.train.keep_checkpoints,
            weights=engine.full_weights(), write_files=engine.save_files, first_error=engine.first_error,
            shared={
                "step": step, "world": engine.world, "networks": list(engine.nets),
                "engine": engine.state_dict(),
                "schedulers": {name: s.state_dict() for name, s in job.schedulers.items()},
                "guard": watch.state_dict(),
            },
            per_rank={"rng": rng_state(), "data": engine.data.position.state_dict(), "recipe": job.recipe.state_dict()},
        )
    except NonfiniteCheckpoint as exc:
        return Divergence("state", str(exc))
    return None


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
