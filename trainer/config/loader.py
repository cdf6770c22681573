"""Typed experiment configs: dataclass defaults <- YAML file <- `key=value` overrides.

Every value is checked against its field's type before anything starts, so a typo costs one
line on the terminal (exit 2), never a half-started multi-node job. The recipe section is typed
by the recipe it names: each recipe module declares its own `Params` dataclass.
"""

from __future__ import annotations

import logging
import math
import typing
from dataclasses import asdict, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from gannet.models.recipes import get_recipe
from gannet.trainer.config.schema import Config, OptimConfig
from gannet.trainer.errors import ConfigError

# Configs and presets are package data (`gannet.configs` and `gannet.launch`; pyproject.toml lists
# their YAML files), located through the import system rather than beside this file, so an
# installed gannet finds them from any directory. `files()` of a package on disk is a Path.
# Users name them by their source-tree folder (`launch/deepspeed/zero2.yaml`).
CONFIG_DIR = Path(str(resources.files("gannet.configs")))
RESOURCE_PACKAGES = {"configs": "gannet.configs", "launch": "gannet.launch"}
log = logging.getLogger("gannet")


def config_names() -> list[str]:
    """The bundled configs, by name (what `gannet train NAME` accepts)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path as given, or a bundled config (`lsgan_mnist` or `configs/lsgan_mnist.yaml`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml", packaged(name_or_path)):
        if candidate is not None and candidate.is_file():
            return candidate
    raise ConfigError(f"config '{name_or_path}' not found: not a file, and not one of configs/ ({', '.join(config_names())})")


def packaged(path: str) -> Path | None:
    """`launch/deepspeed/zero2.yaml` or `configs/x.yaml` inside the installed package, when the path
    names one of gannet's resource packages (the same spelling works in and out of the source tree)."""
    parts = Path(path).parts
    if len(parts) < 2 or parts[0] not in RESOURCE_PACKAGES:
        return None
    return Path(str(resources.files(RESOURCE_PACKAGES[parts[0]]))).joinpath(*parts[1:])


def resolve_preset(item: str) -> Path:
    """A preset path as given if it is a file, else the bundled one of that name (see `packaged`)."""
    path = Path(item)
    if path.is_file():
        return path
    bundled = packaged(item)
    if bundled is not None and bundled.is_file():
        return bundled
    raise ConfigError(f"preset '{item}' not found (neither a file nor one of gannet's bundled presets under launch/)")


def load_config(name_or_path: str, overrides: list[str] = ()) -> Config:
    """Read a YAML config, apply overrides in order, and validate the result.

    An override is `a.b=value`, or the path of a YAML preset (a partial config, such as
    launch/deepspeed/zero2.yaml) merged key by key.
    """
    path = resolve_config_path(name_or_path)
    raw = _read_yaml(path)
    raw.setdefault("name", path.stem)
    for item in overrides:
        if "=" not in item and item.endswith((".yaml", ".yml")):  # a preset: a partial config merged in
            _merge(raw, _read_yaml(resolve_preset(item)))
            continue
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {_shown(item)} is not of the form key=value (e.g. train.steps=100)")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {_shown(item)}: not valid YAML ({_yaml_problem(exc)})") from None
        _set_dotted(raw, key.strip(), value)
    return config_from_dict(raw)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error in one line: the problem and where (its own message spans several lines)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return " ".join(f"{type(exc).__name__}: {problem}{where}".split())


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"preset '{path}' not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a text file (byte {exc.start} is not UTF-8)") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return raw


def _merge(base: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


# Keys renamed since runs saved them in config.yaml (and users wrote them in their YAML): old -> new.
# Read under the new name with a warning, so `gannet resume` of an older run keeps working.
RENAMED = {
    "data.retry_backoff": "data.retry_backoff_s",  # seconds are `_s` everywhere
    "data.flip": "data.mirror",  # StyleGAN's name for the random x-flip, now for every recipe
}


def _renamed(raw: dict) -> dict:
    """`raw` with each old key of RENAMED moved to its new name (sections copied, not changed in place)."""
    for old, new in RENAMED.items():
        section, _, key = old.rpartition(".")
        node = raw.get(section)
        if not isinstance(node, dict) or key not in node:
            continue
        if new.rpartition(".")[2] in node:
            raise ConfigError(f"{old} was renamed {new}: give only {new}")
        raw[section] = {(new.rpartition(".")[2] if k == key else k): v for k, v in node.items()}
        log.warning("config key %s is now %s; read as such", old, new)
    return raw


def config_from_dict(raw: dict) -> Config:
    """Build a validated Config from plain data (YAML, a run's saved config.yaml)."""
    raw = _renamed(dict(raw))
    recipe_raw = raw.pop("recipe", None)
    if not isinstance(recipe_raw, dict) or "name" not in recipe_raw:
        raise ConfigError("recipe.name is required (e.g. recipe: {name: lsgan})")
    recipe_raw = dict(recipe_raw)
    recipe_cls = get_recipe(str(recipe_raw.pop("name"))).Params
    cfg = _build(Config, raw, "")
    cfg.recipe = _build(recipe_cls, recipe_raw, "recipe.")
    _check_ranges(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """Plain data for config.yaml and W&B; `config_from_dict` reads it back to an equal Config."""
    out = asdict(cfg)
    out["recipe"] = {"name": cfg.recipe.name, **asdict(cfg.recipe)}
    return _plain(out)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _shown(name: str) -> str:
    """A user-typed key in quotes, escaped if it holds line breaks or other unprintable characters
    (an error is always one line)."""
    return f"'{name}'" if name.isprintable() else repr(name)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {_shown(key)}: {_shown(part)} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a section of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.init]
    unknown = sorted(set(raw) - set(names), key=str)  # YAML keys may be numbers, null, ...
    if unknown:
        raise ConfigError(f"unknown key {_shown(prefix + str(unknown[0]))} (allowed in {prefix.rstrip('.') or 'the top level'}: "
                          f"{', '.join(names)})")
    values = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        if is_dataclass(hint):
            values[name] = _build(hint, raw[name], f"{prefix}{name}.")
        elif hint is Any:
            continue
        else:
            values[name] = _coerce(raw[name], hint, f"{prefix}{name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if isinstance(value, bool):  # YAML reads no/off/false and on/true as booleans
            value = {False: "no" if "no" in allowed else "off", True: "on"}[value]
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed (choose one of: {', '.join(map(str, allowed))})")
        return value
    if origin is list:  # any length (R3GAN's per-stage model.widths)
        (arg,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. [256, 256, 128]")
        return [_coerce(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must be a list of {len(args)} values, e.g. [0.5, 0.999]")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported config type {hint}")


def _check_ranges(cfg: Config) -> None:
    """Values that type-check but cannot work: caught here, not in the middle of a run."""
    positive = {
        "data.image_size": cfg.data.image_size,
        "data.channels": cfg.data.channels,
        "data.batch_size": cfg.data.batch_size,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "model.z_dim": cfg.model.z_dim,
        "model.g_width": cfg.model.g_width,
        "model.d_width": cfg.model.d_width,
        "model.cond_dim": cfg.model.cond_dim,
        "train.steps": cfg.train.steps,
        "train.grad_accum": cfg.train.grad_accum,
        "train.log_every": cfg.train.log_every,
        "train.sample_every": cfg.train.sample_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "train.num_samples": cfg.train.num_samples,
        "train.max_nonfinite": cfg.train.max_nonfinite,
        "train.rollback_lr_factor": cfg.train.rollback_lr_factor,
        "train.spike_threshold": cfg.train.spike_threshold,
        "train.max_spikes": cfg.train.max_spikes,
        "train.dist_timeout_s": cfg.train.dist_timeout_s,
        "data.prefetch_factor": cfg.data.prefetch_factor,
        "optim.g.lr": cfg.optim.g.lr,
        "optim.d.lr": cfg.optim.d.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be > 0")
    if cfg.model.text_norm == "batch" and cfg.data.batch_size < 2:
        raise ConfigError(f"model.text_norm=batch standardises captions over the batch: data.batch_size={cfg.data.batch_size} "
                          "must be >= 2 per process (or set model.text_norm=none)")
    if cfg.eval.extractor == "inception" and not Path(cfg.eval.inception).is_file():  # checked before any process starts
        raise ConfigError(
            f"eval.inception={cfg.eval.inception!r}: extractor=inception needs the standard FID Inception file. Put "
            f"inception-2015-12-05.pt (TorchScript, from StyleGAN2-ADA's metrics) on disk and set eval.inception=PATH; "
            f"gannet never downloads at run time. Or use eval.extractor=classifier (offline, trained by gannet)."
        )
    if cfg.eval.samples < 10:
        raise ConfigError(f"eval.samples={cfg.eval.samples} must be >= 10")
    for key, value in {"data.num_workers": cfg.data.num_workers, "data.max_errors": cfg.data.max_errors,
                       "data.retries": cfg.data.retries, "data.retry_backoff_s": cfg.data.retry_backoff_s,
                       "eval.every": cfg.eval.every, "train.spike_window": cfg.train.spike_window,
                       "train.max_rollbacks": cfg.train.max_rollbacks}.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    if not cfg.train.spike_ratio > 1:
        raise ConfigError(f"train.spike_ratio={cfg.train.spike_ratio} must be > 1 (a spike is that many times its median)")
    for net in ("g", "d"):
        opt: OptimConfig = getattr(cfg.optim, net)
        if opt.clip_grad < 0:
            raise ConfigError(f"optim.{net}.clip_grad={opt.clip_grad} must be >= 0 (0 = off)")
        if not all(0.0 <= b < 1.0 for b in opt.betas):
            raise ConfigError(f"optim.{net}.betas={list(opt.betas)} must each be in [0, 1)")
        if opt.schedule == "linear" and not 0 <= opt.decay_from < cfg.train.steps:
            raise ConfigError(f"optim.{net}.decay_from={opt.decay_from} must be in [0, train.steps={cfg.train.steps})")
        if opt.schedule == "cosine" and not (opt.decay_kimg > opt.warmup_kimg >= 0 and opt.lr_final >= 0 and 0 <= opt.beta2_final < 1):
            raise ConfigError(f"optim.{net}: schedule=cosine needs decay_kimg={opt.decay_kimg} > warmup_kimg={opt.warmup_kimg} >= 0, "
                              f"lr_final={opt.lr_final} >= 0 and beta2_final={opt.beta2_final} in [0, 1)")
    if not cfg.train.compile_backend:
        raise ConfigError("train.compile_backend must name a torch.compile backend (inductor, aot_eager, ...)")
    if cfg.train.compile == "on" and cfg.train.strategy == "deepspeed" and 3 in (cfg.optim.g.zero_stage, cfg.optim.d.zero_stage):
        raise ConfigError("train.compile=on does not work with ZeRO-3 (it gathers parameters in module hooks); "
                          "use zero_stage 0-2 or train.compile=off")
    if cfg.train.channels_last == "on" and cfg.train.strategy == "deepspeed":
        raise ConfigError("train.channels_last=on does not work with train.strategy=deepspeed (ZeRO flattens "
                          "parameters into contiguous buffers); use auto or off")
    if cfg.data.load_size and cfg.data.load_size < cfg.data.image_size:
        raise ConfigError(f"data.load_size={cfg.data.load_size} must be 0 (off) or >= data.image_size={cfg.data.image_size}")
    if cfg.data.channels not in (1, 3):
        raise ConfigError(f"data.channels={cfg.data.channels} is not allowed (choose one of: 1, 3)")
    cfg.recipe.validate()  # every RecipeParams has it (the recipe contract)
    _check_double_backward(cfg)


def _check_double_backward(cfg: Config) -> None:
    """A gradient penalty (R1, WGAN-GP, MA-GP) back-propagates through D's gradient; ZeRO-3 releases
    D's gathered weights before that second backward reaches them, so the pair is refused up front."""
    penalised = cfg.recipe.double_backward
    stages = {"G": cfg.optim.g.zero_stage, "D": cfg.optim.d.zero_stage}
    for name in penalised:
        if cfg.train.strategy == "deepspeed" and stages[name] == 3:
            raise ConfigError(f"a gradient penalty on {name} (recipe.r1_gamma / gp_weight / ma_gp_weight / gamma > 0) needs "
                              f"optim.{name.lower()}.zero_stage <= 2 under DeepSpeed: ZeRO-3 frees {name}'s weights "
                              f"before the penalty's double backward reaches them")

