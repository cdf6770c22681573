"""`gannet bench`: measured speed and per-rank memory, each against a reference from the same run.

Two tables:
- throughput: the real `gannet train` on 1 and on N processes (torchrun), images/s and ms per
  step taken from the run's own metrics over the second half (start-up excluded); the ratio to
  the 1-process run is the figure that matters.
- memory per rank: one engine per strategy (DDP, ZeRO-1/2/3) on N processes; after a real
  backward, the bytes this rank holds in parameters, gradients, optimizer state (Adam's moments)
  and ZeRO's fp32 master copies, found by walking the tensors the model and the (ZeRO) optimizer
  own, counting each storage once.

Nothing here is asserted: the numbers go to the terminal and to a JSON file.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from trainer.engine import free_port
from trainer.tracking import read_metrics

STRATEGIES = {"ddp": [], "zero1": ["train.strategy=deepspeed", "optim.g.zero_stage=1", "optim.d.zero_stage=1"],
              "zero2": ["train.strategy=deepspeed", "optim.g.zero_stage=2", "optim.d.zero_stage=2"],
              "zero3": ["train.strategy=deepspeed", "optim.g.zero_stage=3", "optim.d.zero_stage=3"]}
# ZeRO buffers that hold gradients or fp32 master weights, by DeepSpeed's attribute names (stage 1/2 and 3)
DS_GRAD_ATTRS = ("grads_in_partition", "averaged_gradients", "grad_partitions_flat_buffer", "ipg_buffer")
DS_MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


def _launch(processes: int, args: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, *args]
    return [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(processes),
            "--master_port", str(free_port()), *args]


def _env(cpu: bool, processes: int) -> dict[str, str]:
    """On CPU, the cores are shared out between the processes, so 1 vs N compares the same machine."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if cpu:
        env.update(OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // processes)), DS_ACCELERATOR="cpu")
    return env


def _check(result: subprocess.CompletedProcess, what: str) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"bench {what} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")


def throughput(config: str, overrides: list[str], processes: int, steps: int, cpu: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["-m", "trainer", "train", config, *overrides, f"train.steps={steps}", f"train.log_every={steps // 2}",
                f"train.sample_every={steps}", f"train.checkpoint_every={steps}", "log.wandb=disabled", f"run_dir={tmp}/run"]
        if cpu and processes > 1:
            args.append("train.cpu=true")
        result = subprocess.run(_launch(processes, args), env=_env(cpu, processes), capture_output=True, text=True)
        _check(result, f"throughput on {processes} process(es)")
        last = read_metrics(Path(tmp, "run"))[-1]
    from trainer.config import load_config

    ips = last["perf/images_per_s"]
    return {"processes": processes, "images_per_s": ips,
            "ms_per_step": 1000 * load_config(config, overrides).images_per_step(processes) / ips}


def storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set[int]) -> int:
    """Bytes of the distinct storages behind `tensors` not already in `seen` (views count once)."""
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _flat(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flat(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    return [value]


def rank_bytes(module: torch.nn.Module, optimizer: Any) -> dict[str, int]:
    """What this rank holds for one network: parameters, gradients, optimizer state, and the fp32
    master copies ZeRO keeps beside the parameters (its optimizer steps on those)."""
    seen: set[int] = set()
    params = [getattr(p, "ds_tensor", p) for p in module.parameters()]  # ZeRO-3 keeps only a partition
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate/ZeRO wrappers hold the torch optimizer
    out = {"params": storage_bytes(params, seen)}
    out["grads"] = storage_bytes([p.grad for p in module.parameters()] +
                                 _flat([getattr(optimizer, a, None) for a in DS_GRAD_ATTRS]), seen)
    out["optimizer"] = storage_bytes(_flat(list(inner.state.values())), seen)  # Adam's moments
    out["master"] = storage_bytes(_flat([getattr(optimizer, a, None) for a in DS_MASTER_ATTRS]), seen)
    return out


def memory_worker(out: str, config: str, overrides: list[str]) -> None:
    """Under torchrun: build the engine, train one iteration, then measure after one more backward."""
    from models.recipes import get_recipe
    from trainer.config import load_config
    from trainer.data import DataStream, expand_urls
    from trainer.engine import DeepSpeedEngine, make_engine

    cfg = load_config(config, overrides)
    engine = make_engine(cfg)
    torch.manual_seed(cfg.seed)
    recipe = get_recipe(cfg.recipe.name)(cfg.recipe, cfg)
    nets = recipe.build()
    engine.prepare(nets, {name: torch.optim.Adam(net.parameters(), lr=cfg.optim.g.lr) for name, net in nets.items()})
    engine.data = DataStream(expand_urls(cfg.data.shards), cfg.data, rank=engine.rank, world=engine.world, seed=cfg.seed)
    recipe.iteration(engine)  # optimizer state is allocated on the first step
    report, batch = {}, engine.batch()
    for name in engine.nets:  # the recipe's own losses, so conditional networks get their labels/captions
        if name == "G":
            with engine.frozen("D"):
                loss = recipe.g_objective(engine, batch)[0]
        else:
            loss = recipe.d_objective(engine, batch)[0]
        if isinstance(engine, DeepSpeedEngine):
            engine.nets[name].backward(loss)
        else:
            engine.accelerator.backward(loss)
        report[name] = rank_bytes(engine.module(name), engine.optimizers[name])
    if engine.is_main:
        Path(out).write_text(json.dumps({"world": engine.world, "networks": report}))
    engine.close()


def memory(config: str, overrides: list[str], strategy: str, world: int, cpu: bool) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        extra = [*STRATEGIES[strategy], *(["train.cpu=true"] if cpu else [])]
        args = ["-m", "trainer.bench", out.name, config, *overrides, *extra]
        result = subprocess.run(_launch(world, args), env=_env(cpu, world), capture_output=True, text=True)
        _check(result, f"memory under {strategy}")
        report = json.loads(Path(out.name).read_text())
    totals = {k: sum(net[k] for net in report["networks"].values()) for k in ("params", "grads", "optimizer", "master")}
    return {"strategy": strategy, "world": report["world"], **totals, "total": sum(totals.values()), "networks": report["networks"]}


def run_bench(config: str, overrides: list[str], *, processes: list[int], world: int, steps: int,
              strategies: list[str], out: Path) -> dict[str, Any]:
    cpu = not torch.cuda.is_available()
    speed = [throughput(config, overrides, p, steps, cpu) for p in processes]
    for row in speed:
        row["speedup_vs_1"] = row["images_per_s"] / speed[0]["images_per_s"]
    mem = [memory(config, overrides, s, world, cpu) for s in strategies]
    for row in mem:
        row["optimizer_vs_ddp"] = row["optimizer"] / mem[0]["optimizer"]
        row["total_vs_ddp"] = row["total"] / mem[0]["total"]
    device = torch.cuda.get_device_name() if not cpu else f"CPU ({os.cpu_count()} cores)"
    result = {"config": config, "overrides": overrides, "device": device, "throughput": speed, "memory_per_rank": mem}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(format_report(result))
    return result


def format_report(result: dict[str, Any]) -> str:
    mib = lambda n: f"{n / 2**20:8.2f}"  # noqa: E731
    lines = [f"gannet bench: {result['config']} {' '.join(result['overrides'])} on {result['device']}", "",
             "throughput (gannet train, second half of the run)",
             f"{'processes':>9} {'images/s':>10} {'ms/step':>9} {'vs 1 proc':>10}"]
    lines += [f"{r['processes']:>9} {r['images_per_s']:>10.1f} {r['ms_per_step']:>9.1f} {r['speedup_vs_1']:>9.2f}x"
              for r in result["throughput"]]
    lines += ["", "memory per rank, G + D (MiB)",
              f"{'strategy':>8} {'world':>5} {'params':>8} {'grads':>8} {'optim':>8} {'master':>8} {'total':>8} "
             f"{'optim/ddp':>9} {'total/ddp':>9}"]
    lines += [f"{r['strategy']:>8} {r['world']:>5} {mib(r['params'])} {mib(r['grads'])} {mib(r['optimizer'])} "
              f"{mib(r['master'])} {mib(r['total'])}"
              f" {r['optimizer_vs_ddp']:>9.2f} {r['total_vs_ddp']:>9.2f}" for r in result["memory_per_rank"]]
    return "\n".join(lines)


if __name__ == "__main__":
    memory_worker(sys.argv[1], sys.argv[2], sys.argv[3:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_cyclegan_step(nets: dict[str, torch.nn.Module], lr: float, betas: tuple[float, float],
                            params: Any) -> Callable[[torch.Tensor, torch.Tensor], dict[str, float]]:
    """The reference implementation's `CycleGANModel.optimize_parameters`, re-written plainly in eager
    PyTorch over the same four networks: one Adam over both generators (itertools.chain) and one over
    both discriminators, D frozen by requires_grad during the G step, two D backwards."""
    from models.recipes.cyclegan import ImagePool

    G_A, G_B, D_A, D_B = nets["G"]["AB"], nets["G"]["BA"], nets["D"]["B"], nets["D"]["A"]  # reference names
    opt_G = torch.optim.Adam(itertools.chain(G_A.parameters(), G_B.parameters()), lr=lr, betas=betas)
    opt_D = torch.optim.Adam(itertools.chain(D_A.parameters(), D_B.parameters()), lr=lr, betas=betas)
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
    from models.recipes import get_recipe
    from trainer.config import load_config
    from trainer.engine import make_engine

    cfg = load_config(config, overrides)
    engine = make_engine(cfg)
    recipe = get_recipe(cfg.recipe.name)(cfg.recipe, cfg)
    torch.manual_seed(cfg.seed)
    nets = recipe.build()
    torch.manual_seed(cfg.seed)
    reference_nets = {name: net.to(engine.device) for name, net in recipe.build().items()}  # the same weights
    opt = cfg.optim.g
    engine.prepare(nets, {n: torch.optim.Adam(m.parameters(), lr=opt.lr, betas=opt.betas) for n, m in nets.items()})
    shape = (cfg.data.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    batches = [(torch.rand(shape, generator=torch.Generator().manual_seed(i)) * 2 - 1).to(engine.device) for i in range(4)]

    def batch_stream() -> Iterator[dict[str, torch.Tensor]]:
        for i in itertools.count():
            yield {"image": batches[i % 4], "image_b": batches[(i + 1) % 4]}

    engine.data = batch_stream()
    reference = reference_cyclegan_step(reference_nets, opt.lr, opt.betas, cfg.recipe)
    ref_calls = itertools.count()

    def reference_step() -> dict[str, float]:
        i = next(ref_calls)
        return reference(batches[i % 4], batches[(i + 1) % 4])

    times, first = interleaved({"gannet": lambda: {k: v.item() for k, v in recipe.iteration(engine).items()},
                                "reference": reference_step}, steps, engine.device)
    ours, theirs, ours_first, theirs_first = times["gannet"], times["reference"], first["gannet"], first["reference"]
    engine.close()
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    device = torch.cuda.get_device_name() if engine.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    result = {
        "config": config, "overrides": overrides, "device": device, "image_size": cfg.data.image_size,
        "batch_size": cfg.data.batch_size, "steps_timed": steps,
        "params": {name: sum(p.numel() for p in engine.module(name).parameters()) for name in ("G", "D")},
        "gannet_ms": 1000 * median(ours), "reference_ms": 1000 * median(theirs),
        "first_step_losses": {"gannet": {k: ours_first[k] for k in ("loss_g", "loss_d")}, "reference": theirs_first},
    }
    result["ratio"] = result["gannet_ms"] / result["reference_ms"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"gannet bench --reference-step: {config} {' '.join(overrides)} on {device}\n"
          f"CycleGAN training step, {cfg.data.image_size} px, batch {cfg.data.batch_size} "
          f"(G pair {result['params']['G']:,} and D pair {result['params']['D']:,} parameters), median of {steps}:\n"
          f"  gannet (recipe on the engine) {result['gannet_ms']:9.1f} ms\n"
          f"  reference (plain eager)       {result['reference_ms']:9.1f} ms\n"
          f"  ratio gannet/reference        {result['ratio']:9.3f}\n"
          f"  first-step losses: gannet G {ours_first['loss_g']:.6f} D {ours_first['loss_d']:.6f}, "
          f"reference G {theirs_first['loss_g']:.6f} D {theirs_first['loss_d']:.6f}")
    return result
