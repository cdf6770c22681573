"""`gannet bench scaling` and `gannet bench memory`: measured throughput and per-rank memory, each
against a reference from the same run.

- scaling: the real `gannet train` on 1 and on N processes (torchrun), images/s and ms per
  step taken from the run's own metrics over the second half (start-up excluded); the ratio to
  the 1-process run is the figure that matters.
- memory per rank: one engine per strategy (DDP, ZeRO-1/2/3) on N processes; after a real
  backward, the bytes this rank holds in parameters, gradients, optimizer state (Adam's moments)
  and ZeRO's fp32 master copies, found by walking the tensors the model and the (ZeRO) optimizer
  own, counting each storage once; the activations, the tensors autograd saves for the largest
  update's backward (linear in the batch: what `data.batch_size` adds per rank); and the bytes
  each rank hands to collectives in one iteration (DDP's gradient buckets, ZeRO's traffic).

Nothing here is asserted: the numbers go to the terminal and to a JSON file. The CycleGAN step
against a plain eager reference is gannet.trainer.bench.step (`gannet bench step`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from gannet.trainer.config.loader import load_config
from gannet.trainer.data.stream import ShardExamples, open_stream, stream_urls
from gannet.trainer.engine.distributed import free_port
from gannet.trainer.engine.setup import setup
from gannet.trainer.errors import ConfigError
from gannet.trainer.tracking.tracker import read_metrics

STRATEGIES = {"ddp": [], "zero1": ["train.strategy=deepspeed", "optim.g.zero_stage=1", "optim.d.zero_stage=1"],
              "zero2": ["train.strategy=deepspeed", "optim.g.zero_stage=2", "optim.d.zero_stage=2"],
              "zero3": ["train.strategy=deepspeed", "optim.g.zero_stage=3", "optim.d.zero_stage=3"]}
# ZeRO buffers that hold gradients or fp32 master weights, by DeepSpeed's attribute names (stage 1/2 and 3;
# tests/test_packaging.py checks that the installed DeepSpeed still sets each)
DS_GRAD_ATTRS = ("grads_in_partition", "averaged_gradients", "grad_partitions_flat_buffer")
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


def _strategy_overrides(strategy: str, cpu: bool) -> list[str]:
    return [*STRATEGIES[strategy], *(["train.cpu=true"] if cpu else [])]


def check_launch(result: subprocess.CompletedProcess, what: str) -> None:
    """A failed launch as one first line a table can show: a process the OS killed (torchrun reports
    SIGKILL / exit -9 for a rank, nearly always memory, while its own exit code says only 1; a plain
    child exits -9) is named as such. Every bench mode that starts processes reads failures here."""
    if result.returncode != 0:
        killed = result.returncode == -9 or "SIGKILL" in result.stderr or "exitcode: -9" in result.stderr
        why = "killed by the OS (SIGKILL: out of memory?)" if killed else f"exit {result.returncode}"
        raise RuntimeError(f"bench {what} failed: {why}\n{result.stderr[-3000:]}")


def throughput(config: str, overrides: list[str], processes: int, steps: int, cpu: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        args = ["-m", "gannet", "train", config, *overrides, f"train.steps={steps}", f"train.log_every={steps // 2}",
                f"train.sample_every={steps}", f"train.checkpoint_every={steps}", "log.wandb=disabled", f"run_dir={tmp}/run"]
        if cpu and processes > 1:
            args.append("train.cpu=true")
        result = subprocess.run(_launch(processes, args), env=_env(cpu, processes), capture_output=True, text=True)
        check_launch(result, f"throughput on {processes} process(es)")
        last = read_metrics(Path(tmp, "run"))[-1]
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


class SavedActivations:
    """The activations one update holds: bytes of the tensors autograd saves for its backward (a
    penalty's double-backward graph included), each storage once, parameters excluded (counted as
    parameters), from the previous update to this one's backward; per network, the largest."""

    def __init__(self, params: Iterable[torch.Tensor]):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.seen, self.bytes, self.peak = set(self.params), 0, {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.bytes += storage_bytes([tensor], self.seen)
        return tensor

    def before_backward(self, name: str) -> None:
        self.peak[name] = max(self.peak.get(name, 0), self.bytes)
        self.seen, self.bytes = set(self.params), 0


class Collectives:
    """Bytes this rank hands to collectives in the measured iteration, by operation: DDP's gradient
    buckets through a comm hook that counts each and then all-reduces it as DDP would, and ZeRO's
    traffic as DeepSpeed's own comms logger records it (message sizes, per rank)."""

    def __init__(self, engine: Any):
        self.ddp, self.counting = 0, False
        self.deepspeed = engine.cfg.train.strategy == "deepspeed"
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def hook(state, bucket):  # unannotated: DDP checks a hook's annotations against its own types
            if self.counting:
                self.ddp += bucket.buffer().numel() * bucket.buffer().element_size()
            return default_hooks.allreduce_hook(state, bucket)

        for net in engine.nets.values():  # before the first backward: DDP fixes its hook then
            if isinstance(net, torch.nn.parallel.DistributedDataParallel):
                net.register_comm_hook(None, hook)

    def start(self) -> None:
        self.counting = True
        if self.deepspeed:
            import deepspeed.comm as dist

            dist.comms_logger.reset_data()
            dist.configure(enabled=True, prof_all=True)

    def stop(self) -> dict[str, int]:
        self.counting = False
        out = {"all_reduce": self.ddp} if self.ddp else {}
        if self.deepspeed:
            import deepspeed.comm as dist

            dist.configure(enabled=False)
            for name, sizes in dist.comms_logger.comms_dict.items():
                out[name] = out.get(name, 0) + sum(int(size) * record[0] for size, record in sizes.items())
        return out


def memory_worker(out: str, config: str, overrides: list[str]) -> None:
    """Under torchrun: set the job up, train one iteration (optimizer state is allocated on the
    first step), then, in the second, measure each optimised network just before its optimizer
    step, when its gradients exist, and the activations each update saves for its backward: the
    same for every recipe, whatever its losses."""
    cfg = load_config(config, overrides)
    job = setup(cfg, ShardExamples(cfg))
    engine = job.engine
    engine.data = open_stream(stream_urls(cfg.data), cfg.data, rank=engine.rank, world=engine.world, seed=cfg.seed)
    collectives = Collectives(engine)
    job.recipe.iteration(engine)
    report: dict[str, dict[str, int]] = {}
    engine.before_step.append(lambda name: report.setdefault(name, rank_bytes(engine.module(name), engine.optimizers[name])))
    saved, update = SavedActivations(p for name in engine.nets for p in engine.module(name).parameters()), engine.update

    def measured_update(name: str, loss: torch.Tensor) -> None:
        saved.before_backward(name)
        update(name, loss)

    engine.update = measured_update
    collectives.start()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
        job.recipe.iteration(engine)
    comm = collectives.stop()
    for name, net in report.items():
        net["activations"] = saved.peak.get(name, 0)
    if engine.is_main:
        Path(out).write_text(json.dumps({"world": engine.world, "networks": report, "collectives": comm}))
    engine.close()


def memory(config: str, overrides: list[str], strategy: str, world: int, cpu: bool) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        args = ["-m", "gannet.trainer.bench.scaling", out.name, config, *overrides, *_strategy_overrides(strategy, cpu)]
        result = subprocess.run(_launch(world, args), env=_env(cpu, world), capture_output=True, text=True)
        check_launch(result, f"memory under {strategy}")
        report = json.loads(Path(out.name).read_text())
    totals = {k: sum(net[k] for net in report["networks"].values()) for k in ("params", "grads", "optimizer", "master")}
    activations = max(net["activations"] for net in report["networks"].values())  # one update's graph at a time
    return {"strategy": strategy, "world": report["world"], **totals, "total": sum(totals.values()),
            "activations": activations, "peak": sum(totals.values()) + activations, "networks": report["networks"],
            "collectives": report["collectives"], "communicated": sum(report["collectives"].values())}


def _device(cpu: bool) -> str:
    return torch.cuda.get_device_name() if not cpu else f"CPU ({os.cpu_count()} cores)"


def _write(result: dict[str, Any], out: Path, table: str) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table)
    return result


def scaling_bench(config: str, overrides: list[str], *, processes: list[int], steps: int, out: Path) -> dict[str, Any]:
    """Throughput of real training runs on each process count; `speedup_vs_1` is against the first count."""
    cpu = not torch.cuda.is_available()
    speed = [throughput(config, overrides, p, steps, cpu) for p in processes]
    for row in speed:
        row["speedup_vs_1"] = row["images_per_s"] / speed[0]["images_per_s"]
    result = {"config": config, "overrides": overrides, "device": _device(cpu), "throughput": speed}
    return _write(result, out, format_scaling(result))


def memory_bench(config: str, overrides: list[str], *, world: int, strategies: list[str], out: Path) -> dict[str, Any]:
    """Per-rank bytes under each strategy on `world` processes; the `_vs_ddp` ratios are against the first
    strategy (ddp by default)."""
    cpu = not torch.cuda.is_available()
    strategies, not_measured = plan_strategies(config, overrides, strategies, cpu)
    mem = []
    for strategy in strategies:  # a later strategy that fails (out of memory) keeps the rows measured before it
        try:
            mem.append(memory(config, overrides, strategy, world, cpu))
        except RuntimeError as err:
            if not mem:
                raise
            not_measured[strategy] = str(err).splitlines()[0]
    for row in mem:
        row["optimizer_vs_ddp"] = row["optimizer"] / mem[0]["optimizer"]
        row["total_vs_ddp"] = row["total"] / mem[0]["total"]
    result = {"config": config, "overrides": overrides, "device": _device(cpu), "memory_per_rank": mem, "not_measured": not_measured}
    return _write(result, out, format_memory(result))


def plan_strategies(config: str, overrides: list[str], strategies: list[str], cpu: bool) -> tuple[list[str], dict[str, str]]:
    """Check each strategy's config and the shards here, before any process starts: a strategy the
    config refuses (ZeRO-3 under a gradient penalty) is left out with its reason instead of failing
    the whole table minutes in; missing shards or a refused reference strategy stop with one line."""
    allowed, refused = [], {}
    for strategy in strategies:
        try:
            cfg = load_config(config, [*overrides, *_strategy_overrides(strategy, cpu)])
        except ConfigError as err:
            if strategy == strategies[0]:
                raise
            refused[strategy] = str(err)
            continue
        if not allowed:  # the strategies share the shards: the workers open these, so say now if there are none
            stream_urls(cfg.data)
        allowed.append(strategy)
    return allowed, refused


def format_scaling(result: dict[str, Any]) -> str:
    lines = [f"gannet bench scaling: {result['config']} {' '.join(result['overrides'])} on {result['device']}", "",
             "throughput (gannet train, second half of the run)",
             f"{'processes':>9} {'images/s':>10} {'ms/step':>9} {'vs 1 proc':>10}"]
    lines += [f"{r['processes']:>9} {r['images_per_s']:>10.1f} {r['ms_per_step']:>9.1f} {r['speedup_vs_1']:>9.2f}x"
              for r in result["throughput"]]
    return "\n".join(lines)


def format_memory(result: dict[str, Any]) -> str:
    mib = lambda n: f"{n / 2**20:8.2f}"  # noqa: E731
    lines = [f"gannet bench memory: {result['config']} {' '.join(result['overrides'])} on {result['device']}", "",
             "memory per rank, G + D (MiB; activations: the larger update's saved tensors at data.batch_size)",
             f"{'strategy':>8} {'world':>5} {'params':>8} {'grads':>8} {'optim':>8} {'master':>8} {'total':>8} "
             f"{'optim/ddp':>9} {'total/ddp':>9} {'activ':>8} {'peak':>8} {'comm/step':>9}"]
    lines += [f"{r['strategy']:>8} {r['world']:>5} {mib(r['params'])} {mib(r['grads'])} {mib(r['optimizer'])} "
              f"{mib(r['master'])} {mib(r['total'])}"
              f" {r['optimizer_vs_ddp']:>9.2f} {r['total_vs_ddp']:>9.2f} {mib(r['activations'])} {mib(r['peak'])}  {mib(r['communicated'])}"
              for r in result["memory_per_rank"]]
    lines += [f"{name:>8} not measured: {why}" for name, why in result.get("not_measured", {}).items()]
    return "\n".join(lines)


if __name__ == "__main__":
    memory_worker(sys.argv[1], sys.argv[2], sys.argv[3:])
