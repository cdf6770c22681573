"""Train a few iterations of the real engine + recipe on fixed global batches; save the weights.

Run under a launcher (`torchrun --nproc_per_node W tests/dist_harness.py OUT STEPS key=value ...`).
Whatever the world size, accumulation or strategy, every configuration sees the same global
batches and the same global noise, split into world x accumulation equal chunks, so the final
weights must agree to float tolerance: that is what the equivalence tests assert. Only the data
and noise sources are replaced; networks, recipe, DDP/DeepSpeed and optimizers are the real ones.
HARNESS_NAN_BATCH=CALL:RANK makes that rank's batch number CALL all NaN (fault injection); each
rank then writes OUT.rankR.json: its count of skipped steps and a checksum of its weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.setup import setup  # noqa: E402
from trainer.shards import bundled_mnist  # noqa: E402

GLOBAL_BATCH = 16


def chunk(global_tensor: torch.Tensor, call: int, world: int, rank: int, accumulation: int) -> torch.Tensor:
    """Chunk (micro * world + rank) of the global batch that call number `call` belongs to."""
    micro = call % accumulation
    size = global_tensor.shape[0] // (world * accumulation)
    start = (micro * world + rank) * size
    return global_tensor[start : start + size]


def main(out: str, steps: int, overrides: list[str]) -> None:
    probe = load_config("lsgan_mnist", overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro_batch = GLOBAL_BATCH // (world * probe.train.grad_accum)
    cfg = load_config("lsgan_mnist", [*overrides, f"data.batch_size={micro_batch}", "model.norm=none",
                                      "optim.g.lr=1e-3", "optim.d.lr=1e-3"])
    job = setup(cfg)
    engine, recipe = job.engine, job.recipe

    pixels, _ = bundled_mnist()
    images = torch.from_numpy(pixels[:512]).float().div(127.5).sub(1).unsqueeze(1)
    calls = {"batch": 0, "noise": 0}

    def batch() -> dict[str, torch.Tensor]:
        index = calls["batch"] // cfg.train.grad_accum
        calls["batch"] += 1
        start = (index * GLOBAL_BATCH) % (len(images) - GLOBAL_BATCH)
        part = chunk(images[start : start + GLOBAL_BATCH], calls["batch"] - 1, engine.world, engine.rank, cfg.train.grad_accum)
        if os.environ.get("HARNESS_NAN_BATCH") == f"{calls['batch'] - 1}:{engine.rank}":
            part = torch.full_like(part, float("nan"))
        return {"image": part.to(engine.device, engine.input_dtype)}

    def noise(n: int, dim: int) -> torch.Tensor:
        index = calls["noise"] // cfg.train.grad_accum
        calls["noise"] += 1
        full = torch.randn(GLOBAL_BATCH, dim, generator=torch.Generator().manual_seed(1000 + index))
        part = chunk(full, calls["noise"] - 1, engine.world, engine.rank, cfg.train.grad_accum)
        assert part.shape[0] == n
        return part.to(engine.device, engine.input_dtype)

    engine.batch, engine.noise = batch, noise
    for _ in range(steps):
        recipe.iteration(engine)
    weights = engine.full_weights()
    checksum = sum(float(v.double().sum()) for state in weights.values() for v in state.values())
    with open(f"{out}.rank{engine.rank}.json", "w") as f:
        json.dump({"nonfinite_steps": engine.nonfinite_steps, "checksum": checksum}, f)
    if engine.is_main and engine.fast.compile:  # what torch.compile captured, for the compile tests
        from trainer.fast import compile_report

        Path(f"{out}.compile.txt").write_text(compile_report(len(engine.optimizers)))
    if engine.is_main:
        save_file({f"{name}.{k}": v.float().contiguous() for name, state in weights.items() for k, v in state.items()}, out)
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
