"""Train a few iterations of the real engine + recipe on fixed global batches; save the weights.

Run under a launcher (`torchrun --nproc_per_node W tests/dist_harness.py OUT STEPS key=value ...`).
Whatever the world size, accumulation or strategy, every configuration sees the same global
batches and the same global noise, split into world x accumulation equal chunks, so the final
weights must agree to float tolerance: that is what the equivalence tests assert. Only the data
and noise sources are replaced; networks, recipe, DDP/DeepSpeed and optimizers are the real ones.
HARNESS_CONFIG names the config (default lsgan_mnist). HARNESS_NAN_BATCH=CALL:RANK makes
that rank's batch number CALL all NaN, HARNESS_INF_GRAD=CALL:RANK
makes D's gradient from that batch infinite with a finite loss (an overflow in backward): fault
injection. Each rank then writes OUT.rankR.json: its count of skipped steps, a checksum of its
weights, whether each skipped step left D's weights and optimizer state exactly as they were, and
each DeepSpeed engine's (micro steps, optimizer steps, skipped steps) beside gannet's micro-batch count,
and after closing the job OUT.rankR.threads.json: the names of the threads still running (what the
interpreter's teardown will meet).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from gannet.trainer.config.loader import load_config  # noqa: E402
from gannet.trainer.data.shards import bundled_mnist  # noqa: E402
from gannet.trainer.engine.setup import setup  # noqa: E402

GLOBAL_BATCH = 16


def chunk(global_tensor: torch.Tensor, call: int, world: int, rank: int, accumulation: int) -> torch.Tensor:
    """Chunk (micro * world + rank) of the global batch that call number `call` belongs to."""
    micro = call % accumulation
    size = global_tensor.shape[0] // (world * accumulation)
    start = (micro * world + rank) * size
    return global_tensor[start : start + size]


def d_state(engine) -> list[torch.Tensor]:
    """D's parameters (whole, ZeRO-3 gathered) and its optimizer's state (this rank's partition
    under ZeRO, with the fp32 master weights), as copies."""
    names = {name for name, _ in engine.module("D").named_parameters()}
    optimizer = engine.optimizers["D"]
    base = getattr(optimizer, "optimizer", optimizer)  # Accelerate's and ZeRO's wrappers hold a torch optimizer
    masters = [p.detach().clone() for group in base.param_groups for p in group["params"]]
    moments = [v.clone() for state in base.state.values() for v in state.values() if torch.is_tensor(v)]
    return [v for k, v in engine.full_weights()["D"].items() if k in names] + masters + moments


def main(out: str, steps: int, overrides: list[str]) -> None:
    config = os.environ.get("HARNESS_CONFIG", "lsgan_mnist")  # any unconditional MNIST config (r3gan_mnist: 32 px)
    probe = load_config(config, overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro_batch = GLOBAL_BATCH // (world * probe.train.grad_accum)
    cfg = load_config(config, [*overrides, f"data.batch_size={micro_batch}", "model.norm=none",
                               "optim.g.lr=1e-3", "optim.d.lr=1e-3"])
    job = setup(cfg)
    engine, recipe = job.engine, job.recipe

    pixels, _ = bundled_mnist()
    images = torch.from_numpy(pixels[:512]).float().div(127.5).sub(1).unsqueeze(1)
    pad = (cfg.data.image_size - images.shape[-1]) // 2  # on a background canvas, as `gannet shards mnist --size`
    images = torch.nn.functional.pad(images, [pad] * 4, value=-1.0)
    calls = {"batch": 0, "noise": 0}

    def batch() -> dict[str, torch.Tensor]:
        index = calls["batch"] // cfg.train.grad_accum
        calls["batch"] += 1
        start = (index * GLOBAL_BATCH) % (len(images) - GLOBAL_BATCH)
        part = chunk(images[start : start + GLOBAL_BATCH], calls["batch"] - 1, engine.world, engine.rank, cfg.train.grad_accum)
        if os.environ.get("HARNESS_NAN_BATCH") == f"{calls['batch'] - 1}:{engine.rank}":
            part = torch.full_like(part, float("nan"))
        if os.environ.get("HARNESS_INF_GRAD") == f"{calls['batch'] - 1}:{engine.rank}":
            weight, fired = next(engine.module("D").parameters()), []  # this batch's D backward only
            weight.register_hook(lambda g: g if fired else fired.append(1) or g * float("inf"))
        return {"image": part.to(engine.device, engine.input_dtype)}

    def noise(n: int, dim: int) -> torch.Tensor:
        index = calls["noise"] // cfg.train.grad_accum
        calls["noise"] += 1
        full = torch.randn(GLOBAL_BATCH, dim, generator=torch.Generator().manual_seed(1000 + index))
        part = chunk(full, calls["noise"] - 1, engine.world, engine.rank, cfg.train.grad_accum)
        assert part.shape[0] == n
        return part.to(engine.device, engine.input_dtype)

    engine.batch, engine.noise = batch, noise
    untouched = []
    faults = any(os.environ.get(v) for v in ("HARNESS_NAN_BATCH", "HARNESS_INF_GRAD"))  # copies only where a step can skip
    for _ in range(steps):
        before = d_state(engine) if faults else []
        recipe.iteration(engine)
        if faults and "D" in engine.skipped:
            untouched.append(all(torch.equal(a, b) for a, b in zip(before, d_state(engine))))
    weights = engine.full_weights()
    checksum = sum(float(v.double().sum()) for state in weights.values() for v in state.values())
    counters = {name: [net.micro_steps, net.global_steps, net.skipped_steps, engine._micro.get(name, 0)]
                for name, net in engine.nets.items() if hasattr(net, "skipped_steps")}
    with open(f"{out}.rank{engine.rank}.json", "w") as f:
        json.dump({"nonfinite_steps": engine.nonfinite_steps, "checksum": checksum, "untouched": untouched,
                   "deepspeed": counters}, f)
    if engine.is_main and engine.fast.compile:  # what torch.compile captured, for the compile tests
        from gannet.trainer.engine.fast import compile_report

        Path(f"{out}.compile.txt").write_text(compile_report(len(engine.optimizers)))
    if engine.is_main:
        save_file({f"{name}.{k}": v.float().contiguous() for name, state in weights.items() for k, v in state.items()}, out)
    rank = engine.rank
    job.close()
    with open(f"{out}.rank{rank}.threads.json", "w") as f:  # what is left running once the job is closed
        json.dump(sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")), f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
