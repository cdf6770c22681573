"""The distributed engine: processes, devices, precision and gradient sync; recipes see a `Step`.

The engine does not know which GAN it runs. Recipes call `update(name, loss)` once per
micro-batch and `frozen(name)` around a network used inside another network's update; the engine
maps them onto one of two strategies (`train.strategy`), following the distributed rules in
docs/architecture.md:

- `ddp`: Accelerate wraps each network in DDP (or nothing, on one process). BatchNorm buffers
  are not broadcast (D sees real and fake batches in separate forwards); gradients of all but the
  last micro-batch of an accumulation stay local (`no_sync`); a frozen network runs under
  `no_sync` so its reducer never waits for gradients that will not come.
- `deepspeed`: one native DeepSpeed engine per network, each with its own optimizer and ZeRO
  stage (`optim.g.zero_stage`, `optim.d.zero_stage`). Accelerate still starts the processes and
  the process group; DeepSpeed engines are built on top with `deepspeed.initialize`. (Accelerate's
  own DeepSpeed integration drives one engine per Accelerator, and `accelerator.backward` would
  step the last-prepared engine, so the native API is the one path here.) Each engine scales the
  loss by its accumulation steps and steps only at the boundary, so recipes never pre-divide.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import warnings
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs
from torch import nn

from gannet.trainer.checkpoint.store import require_finite
from gannet.trainer.config.schema import Config, OptimConfig
from gannet.trainer.engine import fast
from gannet.trainer.errors import GannetError

log = logging.getLogger("gannet")


def free_port() -> int:
    """A free TCP port on loopback, for a rendezvous that gannet itself sets up."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def squares_finite(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """Whether every gradient and its square are finite, in one fused reduction (None: no gradient).
    Adam's second moment adds g^2, which overflows float32 for |g| > 1.8e19 while g itself is
    finite (a loss at 1e21 does that): the squared total norm overflows first, so one finite number
    vouches for every element, and then for the step's result (Adam's update is bounded by lr)."""
    if not grads:
        return None
    return torch.isfinite(torch.nn.utils.get_total_norm(grads).float().square())


def reset_precision(mixed: str) -> None:
    """Let a second engine in one process (the bench, tests) use another precision: Accelerate keeps
    one per process and refuses a change; its process group and device (PartialState) are kept."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed) != mixed:
        AcceleratorState._reset_state(reset_partial_state=False)


class Engine:
    """One training job's processes; `make_engine` picks the strategy. Implements recipes' `Step`."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        cpu = cfg.train.cpu or not torch.cuda.is_available()
        handlers: list[Any] = [DistributedDataParallelKwargs(broadcast_buffers=False)]
        # A collective that waits longer than dist_timeout_s (a rank died or hung) raises instead of
        # blocking forever; the CLI turns that into one line, and the run resumes from its checkpoint.
        timeout = timedelta(seconds=cfg.train.dist_timeout_s)
        if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched as several CPU processes
            handlers.append(InitProcessGroupKwargs(backend="gloo", timeout=timeout))
        else:
            handlers.append(InitProcessGroupKwargs(timeout=timeout))
        # what `auto` means here (bf16, compile, layout, Adam); DDP's bf16 is Accelerate's autocast of
        # each prepared network's forward on this device (CPU included), outputs back in fp32
        self.fast = fast.resolve(cfg, "cpu" if cpu else "cuda")
        if not cpu:
            fast.enable_gpu_kernels()
        mixed = self.fast.mixed_precision if cfg.train.strategy == "ddp" else "no"  # DeepSpeed casts itself
        reset_precision(mixed)
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed, kwargs_handlers=handlers)
        self.accumulation = cfg.train.grad_accum
        self.nets: dict[str, nn.Module] = {}
        self.optimizers: dict[str, Any] = {}
        self.data: Iterator[dict[str, torch.Tensor]] | None = None
        self._micro: dict[str, int] = {}
        self.input_dtype = torch.float32
        # Called with a network's name between its backward and its optimizer step, on the last
        # micro-batch: the gradients and the optimizer state exist (bench's memory table reads them).
        self.before_step: list[Callable[[str], None]] = []
        self.nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss or gradient, this run
        self.skipped: set[str] = set()  # networks whose latest optimizer step was skipped
        self._finite: dict[str, torch.Tensor] = {}  # per network: this accumulation window finite so far
        self._good_buffers: dict[str, list[torch.Tensor]] = {}  # BatchNorm statistics after the last good step

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def optim_config(self, name: str) -> OptimConfig:
        """`optim.g` for G, `optim.d` for D: an optimised network's own settings."""
        return {"G": self.cfg.optim.g, "D": self.cfg.optim.d}[name]

    # -- what callers outside the engine need of the processes ----------------------------------

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """`values` averaged over ranks (every rank calls it)."""
        return self.accelerator.reduce(values, "mean")

    def first_error(self, error: str) -> str:
        """The lowest rank's non-empty `error`, or "" if every rank passed "" (every rank calls it
        and gets the same answer): one collective instead of a barrier where a step can fail on
        some ranks only (a checkpoint write), so all of them stop together with the same reason."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized() and self.world > 1):
            return error
        errors: list[str] = [""] * self.world
        torch.distributed.all_gather_object(errors, error)
        return next((e for e in errors if e), "")

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's `values` concatenated along dim 0, in rank order (every rank calls it)."""
        return self.accelerator.gather(values)

    # -- the Step interface recipes use -------------------------------------------------------

    def batch(self) -> dict[str, torch.Tensor]:
        return self.inputs(next(self.data))

    def inputs(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Network inputs on this rank's device; floating ones (images, text embeddings) in the
        networks' precision, integer ones (labels) as they are. The stream's uint8 images move as
        bytes and become x / 127.5 - 1 on the device (a quarter of the copying at 256 px)."""
        return {k: (v.to(self.device, non_blocking=True).to(torch.float32).div_(127.5).sub_(1.0).to(self.input_dtype)
                    if v.dtype == torch.uint8 else
                    v.to(self.device, self.input_dtype if v.is_floating_point() else v.dtype, non_blocking=True))
                for k, v in tensors.items()}

    def noise(self, n: int, dim: int) -> torch.Tensor:
        return torch.randn(n, dim, device=self.device).to(self.input_dtype)

    def is_boundary(self, name: str) -> bool:
        """Whether the next `update(name, ...)` is the last micro-batch of an accumulation."""
        return (self._micro.get(name, 0) + 1) % self.accumulation == 0

    def update(self, name: str, loss: torch.Tensor) -> None:
        raise NotImplementedError

    @contextmanager
    def frozen(self, name: str) -> Iterator[None]:
        """Use `name` inside another network's update: no grads for it, no gradient sync of it."""
        params = [p for p in self.nets[name].parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            with self._no_sync(name):
                yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def _no_sync(self, name: str) -> Any:
        """Keep `name`'s gradients local for the duration (a no-op without DDP)."""
        return nullcontext()

    @contextmanager
    def gathered(self, name: str) -> Iterator[nn.Module]:
        """The plain network `name` with its full parameters inside the block, read-only (ZeRO-3
        gathers the shards on every rank and drops them after; elsewhere they are whole)."""
        with self._gathered(name):
            yield self.module(name)

    def _gathered(self, name: str) -> Any:
        return nullcontext()

    # -- strategy-specific pieces ---------------------------------------------------------------

    def prepare(self, nets: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        """Wrap each network that has an optimizer; move the others (an EMA copy) to the device as
        they are, without gradients: the recipe maintains them, checkpoints keep them."""
        for name, net in nets.items():
            if name not in optimizers:
                self.nets[name] = net.to(self.device, self.input_dtype).requires_grad_(False)
            else:  # memory layout and torch.compile, before DDP/DeepSpeed wraps it
                fast.prepare_network(name, net.to(self.device), self.fast, self.cfg)
        self._prepare({name: nets[name] for name in optimizers}, optimizers)
        self.nets = {name: self.nets[name] for name in nets}  # the recipe's order (checkpoints list it)

    def _prepare(self, nets: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        raise NotImplementedError

    def module(self, name: str) -> nn.Module:
        """The plain network (for state dicts); forwards go through `self.nets[name]`."""
        if name not in self.optimizers:
            return self.nets[name]
        return self._unwrap(name)

    def _unwrap(self, name: str) -> nn.Module:
        raise NotImplementedError

    def _before_step(self, name: str) -> None:
        for hook in self.before_step:
            hook(name)

    def _note_loss(self, name: str, loss: torch.Tensor) -> None:
        """Remember whether this micro-batch's loss is finite (no device sync until the step)."""
        finite = torch.isfinite(loss.detach()).all()
        self._finite[name] = finite if name not in self._finite else self._finite[name] & finite

    def _all_ranks_finite(self, finite: torch.Tensor) -> bool:
        """True only if every rank's `finite` is: one all-reduce, so all ranks decide the same."""
        flag = finite.float().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return flag.item() > 0

    def _skip_nonfinite(self, name: str, grads_finite: torch.Tensor | None = None) -> bool:
        """Whether to skip `name`'s optimizer step: when any rank saw a non-finite loss, gradient
        (or square of one) in this accumulation window, or its forwards left a non-finite buffer
        (BatchNorm's running statistics, spectral norm's u and v). Counted, and logged once per skip."""
        flag = self._finite.pop(name, torch.tensor(True, device=self.device))
        buffers = [b for b in self.module(name).buffers() if b.is_floating_point()]
        if buffers:
            flag = flag & torch.stack([torch.isfinite(b).all() for b in buffers]).all().to(flag.device)
        if self._all_ranks_finite(flag if grads_finite is None else flag & grads_finite):
            self.skipped.discard(name)
            self._good_buffers[name] = [b.detach().clone() for b in buffers]
            return False
        # The forwards that produced the non-finite loss also fed BatchNorm's running statistics:
        # back to their values at the last good step, so no NaN stays behind in the network.
        for buffer, good in zip(buffers, self._good_buffers.get(name, [])):
            buffer.copy_(good)
        self.skipped.add(name)
        self.nonfinite_steps += 1
        if self.is_main:
            log.warning("non-finite loss, gradient or buffer in %s: its optimizer step was skipped (%d so far)",
                        name, self.nonfinite_steps)
        return True

    def full_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        """Complete weights of every network on every rank (ZeRO-3 gathers; call on all ranks)."""
        return {name: {k: v.detach().clone() for k, v in self.module(name).state_dict().items()} for name in self.nets}

    def state_dict(self) -> dict[str, Any]:
        """The engine's part of the shared checkpoint state (rank 0 writes it)."""
        raise NotImplementedError

    def save_files(self, tmp_dir: Path) -> None:
        """Files every rank writes into the checkpoint folder itself (DeepSpeed's partitions)."""

    def load_state(self, ckpt_dir: Path, shared: Mapping[str, Any], weights: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        raise NotImplementedError

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """End cleanly, on every rank: meet, let every process group finish the work queued on it,
        tear the groups down, and let go of the networks, optimizers and groups, so gloo's worker
        threads are joined here. A collective still running when the interpreter exits kills the
        process with SIGABRT ("terminate called without an active exception": its thread finishes
        the work while Python is torn down). ZeRO-3 prefetches parameters with asynchronous
        all-gathers on DeepSpeed's own copy of the world group, which a barrier on WORLD does not
        wait for and destroy_process_group() does not stop; a barrier on each group does. (Not
        Accelerate's end_training(): it would destroy the groups first, and gannet has no trackers there.)"""
        self.accelerator.wait_for_everyone()
        grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
        if grouped:
            for group in process_groups():
                torch.distributed.barrier(group=group)
        self._release()
        if grouped:
            self._destroy_groups()
        gc.collect()  # the groups' last references go with the networks' cycles: their threads are joined now

    def _release(self) -> None:
        """Drop the wrapped networks and optimizers, here and in Accelerate."""
        self.nets, self.optimizers, self.data = {}, {}, None
        self.accelerator.free_memory()

    def _destroy_groups(self) -> None:
        torch.distributed.destroy_process_group()


def process_groups() -> list[Any]:
    """Every process group of this process, WORLD first (torch keeps no public list of them)."""
    world = torch.distributed.group.WORLD
    others = getattr(getattr(torch.distributed.distributed_c10d, "_world", None), "pg_names", {})
    return [world, *(group for group in others if group is not world)]


class DDPEngine(Engine):
    """Accelerate + DDP (or a single process): the default strategy."""

    def _prepare(self, nets: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        names = list(nets)
        with warnings.catch_warnings():  # torch deprecates broadcast_buffers but says to keep it until init_sync_buffers exists
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
            wrapped = self.accelerator.prepare(*(nets[n] for n in names), *(optimizers[n] for n in names))
        self.nets.update(zip(names, wrapped[: len(names)]))
        self.optimizers = dict(zip(names, wrapped[len(names) :]))

    def _unwrap(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self.nets[name])

    def _no_sync(self, name: str) -> Any:
        if self.accelerator.distributed_type == DistributedType.NO:
            return nullcontext()
        return self.accelerator.no_sync(self.nets[name])

    def update(self, name: str, loss: torch.Tensor) -> None:
        """Backward (scaled for accumulation); step `name`'s optimizer on the last micro-batch."""
        boundary = self.is_boundary(name)
        self._note_loss(name, loss)
        with nullcontext() if boundary else self._no_sync(name):  # sync once, on the last micro-batch
            self.accelerator.backward(loss / self.accumulation)
        self._micro[name] = self._micro.get(name, 0) + 1
        if not boundary:
            return
        self._before_step(name)
        optimizer = self.optimizers[name]
        if self._skip_nonfinite(name, self._grads_finite(name)):
            optimizer.zero_grad(set_to_none=True)  # weights and Adam's state stay as they were
            return
        clip = self.optim_config(name).clip_grad
        if clip > 0:
            self.accelerator.clip_grad_norm_(self.nets[name].parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def _grads_finite(self, name: str) -> torch.Tensor | None:
        """All of `name`'s gradients and their squares finite (None under fp16, whose grad scaler
        skips overflowing steps itself and must see them to lower its scale)."""
        if self.accelerator.scaler is not None:
            return None
        return squares_finite([p.grad for p in self.nets[name].parameters() if p.grad is not None])

    def state_dict(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "scaler": scaler.state_dict() if scaler is not None else None,
        }

    def load_state(self, ckpt_dir: Path, shared: Mapping[str, Any], weights: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        for name, state in weights.items():
            self.module(name).load_state_dict(state)
        for name, opt_state in shared["optimizers"].items():
            self.optimizers[name].load_state_dict(opt_state)
            fast.match_layouts(self.optimizers[name])  # moments in their weights' layout (channels_last)
        if shared["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(shared["scaler"])


class DeepSpeedEngine(Engine):
    """One native DeepSpeed engine per network (ZeRO 0-3 each), on Accelerate's process group."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        import deepspeed

        backend = "gloo" if self.device.type == "cpu" else "nccl"
        if not torch.distributed.is_initialized():  # one process, no launcher: set what torchrun would
            launcher_env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": str(free_port())}
            for key, value in launcher_env.items():
                os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(seconds=cfg.train.dist_timeout_s))
        precision = self.fast.mixed_precision
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)

    def ds_config(self, name: str) -> dict[str, Any]:
        opt = self.optim_config(name)
        micro = self.cfg.data.batch_size
        precision = self.fast.mixed_precision
        return {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": self.accumulation,
            "train_batch_size": micro * self.accumulation * self.world,
            "gradient_clipping": opt.clip_grad,  # DeepSpeed silently defaults to 1.0: always explicit
            "zero_optimization": {"stage": opt.zero_stage},
            "bf16": {"enabled": precision == "bf16"},
            "fp16": {"enabled": precision == "fp16"},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def _prepare(self, nets: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        import deepspeed

        for name, net in nets.items():
            # DeepSpeed casts parameters to bf16/fp16 but not buffers; BatchNorm needs its running
            # statistics in the same dtype as its input, so cast the whole module first.
            net.to(self.input_dtype)
            engine, optimizer, _, _ = deepspeed.initialize(model=net, optimizer=optimizers[name], config=self.ds_config(name))
            self.nets[name], self.optimizers[name] = engine, optimizer

    def _unwrap(self, name: str) -> nn.Module:
        return self.nets[name].module

    @contextmanager
    def _no_sync(self, name: str) -> Iterator[None]:
        """While `name` is frozen inside another network's update, that network's `engine.backward`
        runs through `name`'s engine forward. An engine without ZeRO's optimizer (stage 0) cannot
        tell such a backward from a stray `tensor.backward()` and raises "Direct calls to
        tensor.backward() are not supported"; it is told, through the flag its own `backward` sets,
        that an engine's backward is running. Engines at ZeRO 1-3 accept it as it is."""
        engine = self.nets[name]
        if name not in self.optimizers or getattr(engine, "_support_torch_style_backward", True):
            yield
            return
        with engine._running_engine_backward_lock:
            engine._running_engine_backward_count += 1
            engine._running_engine_backward = True
        try:
            yield
        finally:
            with engine._running_engine_backward_lock:
                engine._running_engine_backward_count -= 1
                engine._running_engine_backward = engine._running_engine_backward_count > 0

    def update(self, name: str, loss: torch.Tensor) -> None:
        """Backward and DeepSpeed's step on every micro-batch (DeepSpeed counts micro-batches itself
        and steps only at the boundary, so both counters stay aligned with `_micro`). At the
        boundary this window's losses and this rank's share of the gradients, as its optimizer is
        about to apply them, decide with one all-reduce; a step to skip is handed to DeepSpeed's
        own overflow path, which drops the whole accumulated step on every rank."""
        engine = self.nets[name]
        boundary = self.is_boundary(name)
        self._note_loss(name, loss)
        engine.backward(loss)  # a non-finite loss too: its gradients are dropped with the step
        skip = False
        if boundary:
            self._before_step(name)
            skip = self._skip_nonfinite(name, self._grads_finite(name))
            if skip:
                self._discard_gradients(name)
        engine.step()
        self._micro[name] = self._micro.get(name, 0) + 1
        if skip and hasattr(engine.optimizer, "overflow") and engine.was_step_applied():
            raise GannetError(f"DeepSpeed applied {name}'s optimizer step that gannet discarded for a non-finite "
                              f"loss or gradient (ZeRO stage {self.optim_config(name).zero_stage}); please report it")

    def _local_grads(self, name: str) -> list[torch.Tensor]:
        """This rank's share of `name`'s gradients, where its DeepSpeed optimizer keeps them after
        the boundary's backward (all reduced over ranks already): ZeRO 1-3 in the optimizer's
        `averaged_gradients` (this rank's partition; ZeRO-2/3 leave `param.grad` empty), ZeRO 0 in
        `param.grad` (fp32, or bf16/fp16 under DeepSpeed's unfused wrapper, which keeps its fp32
        copies only inside its step)."""
        optimizer = self.optimizers[name]
        if isinstance(getattr(optimizer, "averaged_gradients", None), dict):
            return [g for group in optimizer.averaged_gradients.values() if group is not None for g in group if g is not None]
        return [p.grad for p in self.module(name).parameters() if p.grad is not None]

    def _grads_finite(self, name: str) -> torch.Tensor | None:
        """This rank's share of `name`'s gradients and their squares all finite (None under fp16,
        whose loss scaler expects overflows and skips those steps itself)."""
        if self.fast.mixed_precision == "fp16":
            return None
        return squares_finite([g for g in self._local_grads(name) if g.numel()])

    def _discard_gradients(self, name: str) -> None:
        """Make `name`'s coming `engine.step()` change nothing, on every rank. DeepSpeed's own
        optimizers (ZeRO 1-3, and the bf16/fp16 wrappers at ZeRO 0) skip a step whose gradients
        hold an inf or NaN (an overflow check, or a global gradient norm all-reduced over ranks):
        that path clears the accumulated gradients and counts the step as skipped. A NaN is written
        into this rank's share to take it even where only a loss, or another rank, was bad. A plain
        torch optimizer (ZeRO 0 in fp32) has no such path: without gradients Adam leaves weights
        and moments alone."""
        if hasattr(self.optimizers[name], "overflow"):
            grads = [g for g in self._local_grads(name) if g.numel() and not getattr(g, "_zero_padding", False)]
            if grads:
                grads[0].view(-1)[0] = float("nan")
            return
        for p in self.module(name).parameters():
            p.grad = None

    def _release(self) -> None:
        """DeepSpeed's engines first (ZeRO-3's parameter coordinator and hooks), then what ZeRO-3
        keeps for the life of the process, and with it the networks and every parameter's reference
        to the process groups: its stack of modules in a forward (a network used without a backward
        of its own stays there: D, in G's step), and its coordinator's per-class cache of the
        parameters each module releases (a functools.lru_cache keyed by coordinator and module)."""
        from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator

        for name in self.optimizers:
            self.nets[name].destroy()
        getattr(parameter_offload, "FWD_MODULE_STACK", []).clear()
        for method in vars(getattr(partitioned_param_coordinator, "PartitionedParameterCoordinator", object)).values():
            for cell in getattr(method, "__closure__", None) or ():  # under DeepSpeed's NVTX wrapper
                if hasattr(cell.cell_contents, "cache_clear"):
                    cell.cell_contents.cache_clear()
        super()._release()

    def _destroy_groups(self) -> None:
        """Through deepspeed.comm: torch's groups, and DeepSpeed's module-level references to them."""
        import deepspeed

        deepspeed.comm.destroy_process_group()

    def _gathered(self, name: str) -> Any:
        import deepspeed

        if name in self.optimizers and self.optim_config(name).zero_stage == 3:
            return deepspeed.zero.GatheredParameters(list(self.module(name).parameters()), modifier_rank=None)
        return nullcontext()

    def full_weights(self) -> dict[str, dict[str, torch.Tensor]]:
        import deepspeed

        out = {}
        for name in self.nets:
            module = self.module(name)
            sharded = name in self.optimizers and self.optim_config(name).zero_stage == 3
            gather = deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None) if sharded else nullcontext()
            with gather:
                out[name] = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"deepspeed": sorted(self.optimizers)}

    def save_files(self, tmp_dir: Path) -> None:
        """Each engine saves its own (partitioned) state in DeepSpeed's format, on every rank.
        DeepSpeed's save holds barriers of its own: a rank whose write fails (a full disk) would
        leave it and the others would wait there until train.dist_timeout_s. So its writer keeps
        the first error and skips later writes, every rank goes through every engine's save and
        all of their barriers, and the error is raised after, for the checkpoint's agreement. What
        it writes is checked first: a state holding NaN or Inf is refused, like gannet's own files."""
        failed: list[Exception] = []
        for name in self.optimizers:  # every engine's save, even after a failure: each has barriers
            with deferred_errors(self.nets[name].checkpoint_engine) as errors:
                self.nets[name].save_checkpoint(str(tmp_dir / f"deepspeed_{name}"), tag="state", save_latest=False)
            failed += errors
        if failed:
            raise failed[0]

    def load_state(self, ckpt_dir: Path, shared: Mapping[str, Any], weights: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        from gannet.trainer.checkpoint.safe_load import weights_only_loads

        for name, state in weights.items():  # networks without an engine (an EMA copy): from the weights
            if name not in self.optimizers:
                self.nets[name].load_state_dict(state)
        for name in self.optimizers:
            with weights_only_loads(ckpt_dir / f"deepspeed_{name}"):  # DeepSpeed's torch.load would run a crafted pickle
                self.nets[name].load_checkpoint(str(ckpt_dir / f"deepspeed_{name}"), tag="state", load_optimizer_states=True,
                                                load_lr_scheduler_states=False)


@contextmanager
def deferred_errors(writer: Any) -> Iterator[list[Exception]]:
    """Inside the block, `writer.save` (a DeepSpeed checkpoint engine's) keeps its first error in
    the list it yields and skips later writes instead of raising, so the caller passes every
    collective of DeepSpeed's save before it reports the failure. A state that holds NaN or Inf is
    such an error, found before its file is written."""
    failed: list[Exception] = []
    save = writer.save

    def deferred(*args: Any, **kwargs: Any) -> Any:  # save(state_dict, path), by position or by name
        if failed:
            return None
        try:
            state = args[0] if args else kwargs.get("state_dict")
            path = args[1] if len(args) > 1 else kwargs.get("path")
            require_finite(state, Path(str(path)).name)
            return save(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported by the caller, after DeepSpeed's barriers
            failed.append(exc)
            return None

    writer.save = deferred
    try:
        yield failed
    finally:
        del writer.save  # the class's own method again


def make_engine(cfg: Config) -> Engine:
    return {"ddp": DDPEngine, "deepspeed": DeepSpeedEngine}[cfg.train.strategy](cfg)
