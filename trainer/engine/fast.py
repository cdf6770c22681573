"""The speed switches of a run: what `auto` means on the device at hand, and one log line saying
what was chosen and why.

`train.mixed_precision`, `train.compile`, `train.channels_last` and `train.adam` default to `auto`:
the setting measured fastest on this kind of device (README, *Performance*), so a user gets the
fast step without flags. The engine applies the choices (autocast through Accelerate, layout and
compilation of each optimised network at `prepare`), `gannet.trainer.engine.setup` builds Adam with them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from gannet.models import penalties
from gannet.trainer.config.schema import Config

log = logging.getLogger("gannet")

# Measured on the 2-core AVX-512 BF16 CPU, variants timed in turns in one process (README, Performance).
CPU_WHY = {
    "bf16": "this CPU computes bf16 natively (AVX-512 BF16/AMX): measured 1.7x on the CycleGAN step, "
            "losses and Adam state stay fp32",
    "no_bf16": "this CPU has no native bf16 (AVX-512 BF16 or AMX): bf16 would be emulated",
    "compile": "measured 1.02-1.05x on CPU after ~65 s of compiling per network: not worth it by default",
    "adam": "fused Adam: one kernel over all parameters",
    "channels_last": "a conv/BatchNorm net: measured 1.17x on CPU (DCGAN batch 64, bf16); NHWC suits GPU tensor cores",
}


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass
class Choices:
    """What this run uses, and why (`describe()` is the log line)."""

    device: str  # "cuda" or "cpu"
    mixed_precision: str
    compile: bool
    adam: str
    channels_last: dict[str, bool] = field(default_factory=dict)  # per optimised network, set at prepare
    why: dict[str, str] = field(default_factory=dict)
    compile_reported: str = ""  # the last torch.compile report logged (gannet.trainer.loop.report_compile)

    def describe(self) -> str:
        layout = ", ".join(f"{name} {'channels_last' if on else 'contiguous'}" for name, on in self.channels_last.items())
        parts = [f"mixed_precision={self.mixed_precision}", f"compile={'on' if self.compile else 'off'}",
                 f"adam={self.adam}", f"layout: {layout or 'n/a'}"]
        reasons = "; ".join(f"{key}: {text}" for key, text in self.why.items())
        return f"speed settings on {self.device}: {', '.join(parts)} ({reasons})"


def resolve(cfg: Config, device: str) -> Choices:
    """Turn each `auto` into a concrete choice for `device`; explicit settings are kept as given."""
    train, why = cfg.train, {}
    precision = train.mixed_precision
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "no"
            why["mixed_precision"] = "auto: bf16 autocast on this GPU" if precision == "bf16" else "auto: this GPU has no bf16"
        elif train.strategy == "deepspeed":
            precision = "no"
            why["mixed_precision"] = "auto: DeepSpeed's bf16 casts the weights themselves; not measured faster on CPU"
        else:
            precision = "bf16" if cpu_has_fast_bf16() else "no"
            why["mixed_precision"] = "auto: " + CPU_WHY["bf16" if precision == "bf16" else "no_bf16"]
    zero3 = train.strategy == "deepspeed" and 3 in (cfg.optim.g.zero_stage, cfg.optim.d.zero_stage)
    compiled = train.compile == "on"
    if train.compile == "auto":
        compiled = device == "cuda" and not zero3
        why["compile"] = ("auto: on for GPUs" if compiled else "auto: off with ZeRO-3" if zero3
                          else "auto: " + CPU_WHY["compile"])
    adam = train.adam
    if adam == "auto":
        adam = "fused"
        why["adam"] = "auto: " + CPU_WHY["adam"]
    return Choices(device=device, mixed_precision=precision, compile=compiled, adam=adam, why=why)


def adam_kwargs(choice: str) -> dict[str, Any]:
    """torch.optim.Adam's keywords for `train.adam`."""
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[choice]


def enable_gpu_kernels() -> None:
    """On a GPU: TF32 matmuls/convolutions for what stays fp32, and cuDNN's per-shape algorithm search
    (GAN batches keep one shape)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def channels_last_pays(net: nn.Module, setting: str, device: str) -> tuple[bool, str]:
    """Whether `net` should run in channels_last, and why. Instance norm does not keep the layout
    (pytorch#72341: measured 0.91x on the CycleGAN step), so nets with it stay contiguous unless asked."""
    if setting != "auto":
        return setting == "on", f"train.channels_last={setting}"
    if not any(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in net.modules()):
        return False, "no convolutions"
    if any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in net.modules()):
        return False, "InstanceNorm does not keep the layout (pytorch#72341; measured 0.91x)"
    del device  # measured faster on this CPU and the standard choice on GPUs
    return True, CPU_WHY["channels_last"]


def _wants_input_grad(args: tuple, kwargs: dict) -> bool:
    """A penalty's forward (gannet.models.penalties marks them), or an input that is a leaf requiring
    grad: someone differentiates w.r.t. the input itself (R1, WGAN-GP), usually with
    create_graph=True, which compiled graphs cannot back-propagate twice."""
    if penalties.differentiated_twice():
        return True
    return any(isinstance(a, torch.Tensor) and a.is_leaf and a.requires_grad for a in (*args, *kwargs.values()))


def fp32_penalties(net: nn.Module, device: str) -> None:
    """Under autocast (DDP's bf16/fp16), run a gradient penalty's forward in fp32: ||grad_x D||^2 is
    a small difference of large terms that bf16's 8-bit mantissa rounds away, and its double
    backward would inherit the rounding. Wraps `forward` before Accelerate wraps it in autocast; a
    nested autocast(enabled=False) wins over the outer one."""
    inner: Callable = net.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and _wants_input_grad(args, kwargs):
            with torch.autocast(device, enabled=False):
                return inner(*(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args), **kwargs)
        return inner(*args, **kwargs)

    net.forward = forward


def compile_network(net: nn.Module, backend: str) -> None:
    """Compile `net`'s forward in place (the module, its parameters and state-dict keys stay the same,
    so DDP, DeepSpeed, EMA copies and checkpoints see the plain network). Calls whose input is a leaf
    that requires grad (a gradient penalty) run eagerly: double backward needs the eager graph."""
    eager: Callable = net.forward
    compiled = torch.compile(eager, backend=backend)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and _wants_input_grad(args, kwargs):
            return eager(*args, **kwargs)
        return compiled(*args, **kwargs)

    net.forward = forward


def prepare_network(name: str, net: nn.Module, choices: Choices, cfg: Config) -> None:
    """Layout and compilation of one optimised network, before DDP/DeepSpeed wraps it."""
    on, why = channels_last_pays(net, cfg.train.channels_last, choices.device)
    if cfg.train.strategy == "deepspeed":  # ZeRO views parameters as flat bytes: they must be contiguous
        on, why = False, "DeepSpeed flattens parameters into contiguous buffers"
    choices.channels_last[name] = on
    choices.why[f"layout {name}"] = why
    if on:
        net.to(memory_format=torch.channels_last)
    if choices.compile:
        compile_network(net, cfg.train.compile_backend)
    if choices.mixed_precision in ("bf16", "fp16") and cfg.train.strategy == "ddp":  # DeepSpeed casts the weights instead
        fp32_penalties(net, choices.device)


def match_layouts(optimizer: Any) -> None:
    """Give each loaded optimizer state tensor its parameter's memory layout. Checkpoints store tensors
    contiguous; fused Adam on a CPU walks parameter, gradient and moments as flat memory, so a
    channels_last weight with contiguous moments would be updated with the wrong elements' moments."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the torch optimizer
    for param, state in inner.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape and value.stride() != param.stride():
                state[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def compile_report(networks: int) -> str:
    """torch.compile's graphs, graph breaks (with reasons) and recompiles so far, for `networks`
    compiled forwards: logged, so a network that silently fell back to eager or recompiles every
    step is seen. Each compiled frame past the first per network is a recompile (a frozen D, a
    no-grad sampling call, a new input shape), each graph break an extra graph."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    reasons = "; ".join(f"{reason[:120]} (x{n})" for reason, n in list(breaks.items())[:5])
    graphs = counters["stats"].get("unique_graphs", 0)
    recompiles = max(counters["frames"].get("ok", 0) - networks, 0)
    return (f"torch.compile: {graphs} graph(s), {sum(breaks.values())} graph break(s)"
            f"{': ' + reasons if reasons else ''}, {recompiles} recompile(s) of {networks} network(s)")
