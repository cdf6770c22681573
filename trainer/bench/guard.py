"""`gannet bench guard CONFIG`: what the divergence guard costs per training step.

The guard's work each step: every network's losses, gradient squares (one fused norm) and buffers
checked and one all-reduce of the verdict, BatchNorm statistics kept from the last good step, and
the step's scalars averaged over ranks and judged by the spike detector. The same job is timed with
all of that and with none of it, in alternating blocks in one process (the same networks, the same
data stream), so load on the machine falls on both alike: the ratio is the result. The guard's work
at checkpoints (every saved tensor checked once) is not per step and not timed here.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from gannet.trainer.config.loader import load_config
from gannet.trainer.data.stream import ShardExamples, open_stream, stream_urls
from gannet.trainer.engine.distributed import Engine
from gannet.trainer.engine.setup import setup
from gannet.trainer.guard import Watch
from gannet.trainer.loop import step_scalars


def unguarded(engine: Engine) -> None:
    """Switch the engine's per-step checks off: no loss flag, no gradient or buffer check, no vote."""
    engine._note_loss = lambda name, loss: None
    engine._grads_finite = lambda name: None
    engine._skip_nonfinite = lambda name, grads_finite=None: False


def guarded(engine: Engine) -> None:
    for name in ("_note_loss", "_grads_finite", "_skip_nonfinite"):
        engine.__dict__.pop(name, None)  # the class's own methods again


def timed_block(job: Any, watch: Watch | None, steps: int) -> float:
    """Seconds per step over `steps` iterations (the watch judging each, when given)."""
    engine = job.engine
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    start = time.perf_counter()
    for step in range(steps):
        metrics = job.recipe.iteration(engine)
        if watch is not None:
            watch.observe(step, step_scalars(engine, metrics), engine.nonfinite_steps)
        else:
            {k: v.item() for k, v in metrics.items() if v.ndim == 0}  # the logs read the values either way
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return (time.perf_counter() - start) / steps


def guard_bench(config: str, overrides: list[str], *, steps: int, rounds: int, out: Path) -> dict[str, Any]:
    """Per-step time of CONFIG's training step with the guard and without, `rounds` alternating
    blocks of `steps` steps each (after a warm-up block); prints the table, writes `out`."""
    cfg = load_config(config, [*overrides, "log.wandb=disabled"])
    job = setup(cfg, ShardExamples(cfg))
    job.engine.data = open_stream(stream_urls(cfg.data), cfg.data, rank=0, world=1, seed=cfg.seed)
    watch = Watch(cfg.train, speaks=False)
    timed_block(job, watch, steps)  # warm-up: allocator, loader workers, Adam state
    times: dict[str, list[float]] = {"guard": [], "off": []}
    for i in range(rounds):
        for mode in (("guard", "off") if i % 2 == 0 else ("off", "guard")):
            (guarded if mode == "guard" else unguarded)(job.engine)
            times[mode].append(timed_block(job, watch if mode == "guard" else None, steps))
    guarded(job.engine)
    ms = {mode: 1000 * statistics.median(values) for mode, values in times.items()}
    result = {"config": config, "overrides": overrides, "device": str(job.engine.device), "steps_per_block": steps,
              "rounds": rounds, "ms_per_step": ms, "overhead": ms["guard"] / ms["off"] - 1,
              "blocks_ms": {mode: [1000 * t for t in values] for mode, values in times.items()},
              "loadavg": os.getloadavg()}
    print(f"{config} on {result['device']}: {steps} steps x {rounds} rounds per mode, in turns (load {result['loadavg'][0]:.1f})\n"
          f"  guard on   {ms['guard']:8.2f} ms/step\n  guard off  {ms['off']:8.2f} ms/step\n"
          f"  overhead   {100 * result['overhead']:+7.2f}%")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result
