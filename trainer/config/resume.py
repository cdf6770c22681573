"""What a resumed run may change in its config, and the check that refuses the rest.

A checkpoint holds networks of given shapes, optimizer state for given parameters, a recipe's
counters and a position in a given shard list. Resuming it under a config that builds other
networks (`model.g_width=64`: PyTorch's size-mismatch dump), plays another game
(`recipe.loss=nonsaturating`: silently a different GAN from then on), reads other data, or whose
optimizer settings the checkpoint overwrites on load (`optim.g.lr`: the saved learning rate wins)
would break the run or, worse, quietly make it something else. So every key is unsafe unless it is
listed here: what only steers the run from now on (its budget, its cadence of logs, samples and
checkpoints, its evaluation and logging, how each step is computed rather than what it computes,
how faults and I/O are handled) and where the run is found.

Shards may move (node-local scratch on a requeued Slurm job, local disk -> object store): a changed
`data.shards` / `data.shards_b` is accepted when it lists the same shard files by name, in the same
order, in another place. The stream's saved position counts samples in that list, so the names are
what must match, not the folder. A glob (`a-*.tar`) names no files until it is matched, and the old
folder may be gone, so a glob may not move.
"""

from __future__ import annotations

import glob
from typing import Any

import braceexpand

from gannet.trainer.errors import ConfigError

# Dotted keys, or whole sections (a trailing dot), that a resumed run may change.
SAFE_ON_RESUME = (
    "name", "run_dir", "resume",  # where the run is and whether to continue it
    "train.steps",  # the budget: extend or shorten the run
    "train.log_every", "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints", "train.num_samples",
    "train.max_nonfinite", "train.on_nonfinite", "train.rollback_lr_factor", "train.dist_timeout_s",  # fault handling
    "train.spike_window", "train.spike_threshold", "train.spike_ratio", "train.max_spikes", "train.max_rollbacks",
    "train.rollback_skip",  # the divergence guard's thresholds: when to roll back, not what a step computes
    "train.compile", "train.compile_backend", "train.channels_last", "train.adam", "train.cpu",  # how, not what, a step computes
    "data.retries", "data.retry_backoff_s", "data.max_errors", "data.prefetch_factor",  # I/O policy, not the samples
    "eval.", "log.",  # evaluation and logging only read the run
)


MOVABLE = ("data.shards", "data.shards_b")  # safe to change when only the place changes (shard_names)


def shard_names(pattern: str) -> list[str] | None:
    """The file names a shard pattern lists, without where they are: brace ranges expanded, the
    folder / bucket / host dropped ("data/mnist/train-{0..1}.tar" -> ["train-0.tar", "train-1.tar"]);
    None for a glob or a bucket prefix, whose files are only known once listed."""
    urls = [url for part in pattern.split(",") for url in braceexpand.braceexpand(part.strip())]
    if any(glob.has_magic(url) or url.endswith("/") for url in urls):
        return None
    return [url.rsplit("/", 1)[-1] for url in urls]


def same_shards(old: str, new: str) -> bool:
    """Whether two shard patterns list the same files by name, wherever they are."""
    names = shard_names(old)
    return names is not None and names == shard_names(new)


def is_safe(key: str) -> bool:
    return any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in SAFE_ON_RESUME)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"g_width": 64}} -> {"model.g_width": 64}; lists are values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def unsafe_changes(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys set in both plain configs (config_to_dict) whose values differ and that are not safe to
    change on resume, with (saved, new) values. Keys one side lacks (another recipe's parameters, a
    key added in a later gannet) are not compared; a changed recipe shows as recipe.name."""
    old, now = flatten(saved), flatten(new)
    moved = {key for key in MOVABLE if key in old and key in now and same_shards(str(old[key]), str(now[key]))}
    return {key: (old[key], now[key]) for key in sorted(old.keys() & now.keys())
            if old[key] != now[key] and not is_safe(key) and key not in moved}


def check_resumable(saved: dict[str, Any], new: dict[str, Any], run_dir: str) -> None:
    """One line naming the keys, if `new` changes what the run's checkpoints were trained with."""
    changes = unsafe_changes(saved, new)
    if not changes:
        return
    shown = ", ".join(f"{key} ({old!r} -> {now!r})" for key, (old, now) in list(changes.items())[:6])
    more = f" and {len(changes) - 6} more" if len(changes) > 6 else ""
    raise ConfigError(f"{run_dir} was trained with another {shown}{more}: its checkpoints cannot continue under networks, "
                      f"recipe, data or optimizer settings they were not trained with. Undo the change, or start a new run "
                      f"(run_dir=... or name=...); safe to change on resume: train.steps, log/sample/checkpoint cadence, eval.*, log.*, "
                      f"and data.shards where the same brace-listed shard files moved")
