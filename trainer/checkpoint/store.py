"""Atomic, verified, pickle-free checkpoints: RUN/checkpoints/step-00001234/.

A checkpoint is a folder. Every rank writes into `.tmp-step-N/` (rank 0 the shared state: network
weights as safetensors, optimizers, schedulers, counters; each rank its own RNG states and data
position), then rank 0 writes `manifest.json` (size and sha256 of every file, DeepSpeed's per-rank
files included), fsyncs and renames the folder to `step-N`. A rename is atomic, so a run killed
mid-save, or a full disk, leaves the previous checkpoint as the latest. Only the newest `keep`
checkpoints are kept.

The manifest catches what atomicity cannot: a file truncated, lost or altered later (a disk, a
copy between clusters, a person). Resume verifies it and falls back to the newest intact
checkpoint, saying what is wrong with each one it skips; `gannet verify RUN_DIR` checks them all.

A checkpoint never holds NaN or Inf: every rank checks each tensor and number it is about to write
(DeepSpeed's own files included, in their writer) and the checkpoint is refused as a whole
(`NonfiniteCheckpoint`: the loop rolls back instead). Verification reads every tensor too, so a
checkpoint that holds one anyway (an older gannet, a hand edit) counts as damaged.

Checkpoints without a manifest come from gannet versions before manifests. They cannot be
verified: such a checkpoint is "unverified", and resume uses it (with a warning) only while no
newer checkpoint carries a manifest. A checkpoint without a manifest that is newer than one with
a manifest was written by this version and lost its manifest: it counts as damaged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gannet.trainer.checkpoint.statefile import load_state, nonfinite_entries, save_state
from gannet.trainer.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "gannet-checkpoint/1"
CHUNK = 1 << 20  # bytes hashed per read: memory stays flat whatever the file size
NONFINITE = "non-finite values in "  # how a refused write's reason begins, on every rank

log = logging.getLogger("gannet")


class NonfiniteCheckpoint(CheckpointError):
    """The state to save holds NaN or Inf: nothing was written (every rank raises it alike)."""


class NonfiniteState(ValueError):
    """What this rank was about to write holds NaN or Inf (raised before any of it is written)."""


def require_finite(state: Any, where: str) -> None:
    """Refuse to write `state` (nested tensors and numbers) if any of it is NaN or Inf."""
    entries = nonfinite_entries(state)
    if entries:
        raise NonfiniteState(f"{NONFINITE}{where}: {_listed(entries)}")


def _listed(entries: list[str], shown: int = 3) -> str:
    more = f" and {len(entries) - shown} more" if len(entries) > shown else ""
    return ", ".join(entries[:shown]) + more


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies (or an unverified pre-manifest one, see the module
    docstring); None if the run has none. Checked newest first, so an intact latest one is the
    only one hashed; each damaged one skipped is logged with what is wrong. If checkpoints exist
    but none is usable, that is an error rather than a silent fresh start."""
    found = list_checkpoints(run_dir)
    for i in reversed(range(len(found))):
        verdict = _verdict(found[i], older_has_manifest=any((p / MANIFEST).exists() for p in found[:i]))
        if verdict.status == "ok":
            return verdict.path
        if verdict.status == "unverified":
            log.warning("checkpoint %s has no manifest (written by an earlier gannet): using it unverified", verdict.path)
            return verdict.path
        log.warning("checkpoint %s is damaged (%s): skipped", verdict.path, "; ".join(verdict.problems))
    if found:
        raise CheckpointError(f"no intact checkpoint in {checkpoint_dir(run_dir)}: all {len(found)} are damaged "
                              f"(run `gannet verify {run_dir}` for details)")
    return None


@dataclass
class Verdict:
    """What `verify_checkpoint` found: ok, damaged (with the problems), or unverified (no manifest)."""

    path: Path
    status: str  # "ok" | "damaged" | "unverified"
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        if self.status == "damaged":
            return f"{self.path.name}: DAMAGED: {'; '.join(self.problems)}"
        if self.status == "unverified":
            return f"{self.path.name}: unverified (no {MANIFEST}: written before checkpoints carried one)"
        return f"{self.path.name}: ok"


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    """Record the size and hash of every file in `folder` (written last, after all ranks' files)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST:
            files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files}, indent=1))
    _fsync(manifest)


def verify_checkpoint(path: Path) -> Verdict:
    """Check a checkpoint folder against its manifest: every listed file present with its size and
    hash, and no file the manifest does not list (nothing may be slipped in beside the state)."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        problems = nonfinite_files(path)
        return Verdict(path, "damaged", problems) if problems else Verdict(path, "unverified")
    try:
        data = json.loads(manifest.read_text())
        listed = data["files"]
        if data.get("format") != MANIFEST_FORMAT or not isinstance(listed, dict):
            raise ValueError(f"unknown format {data.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return Verdict(path, "damaged", [f"{MANIFEST} is unreadable ({exc})"])
    problems = []
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    for rel in sorted(set(listed) - present):
        problems.append(f"{rel} is missing")
    for rel in sorted(present - set(listed)):
        problems.append(f"{rel} is not in the manifest")
    for rel in sorted(set(listed) & present):
        entry = listed[rel]
        size = (path / rel).stat().st_size
        if not isinstance(entry, dict) or size != entry.get("size"):
            problems.append(f"{rel} has {size} bytes, the manifest says {entry.get('size') if isinstance(entry, dict) else '?'}")
        elif file_sha256(path / rel) != entry.get("sha256"):
            problems.append(f"{rel} does not match its sha256")
    problems = problems or nonfinite_files(path)  # intact files: is what they hold finite?
    return Verdict(path, "damaged", problems) if problems else Verdict(path, "ok")


def nonfinite_files(path: Path) -> list[str]:
    """The files of checkpoint `path` that hold NaN or Inf, each with where: gannet's state files
    (weights, shared and per-rank state) and DeepSpeed's (unpickled weights-only). A file that
    cannot be read is left to the hash check and the loader, which say why."""
    problems = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        try:
            state = _read_state(file)
        except Exception:  # noqa: BLE001 - unreadable: the manifest or the loader reports it
            continue
        entries = nonfinite_entries(state) if state is not None else []
        if entries:
            problems.append(f"{file.relative_to(path).as_posix()} holds non-finite values: {_listed(entries)}")
    return problems


def _read_state(file: Path) -> Any:
    """What a checkpoint file holds, for the finite check (None: not a state file)."""
    if file.suffix == ".safetensors":  # a state file (JSON beside it: structure and numbers) or weights
        return load_state(file.with_suffix("")) if file.with_suffix(".json").is_file() else load_file(str(file))
    if file.suffix == ".pt":
        from gannet.trainer.checkpoint.safe_load import load_torch_file  # imports DeepSpeed: only its runs pay

        return load_torch_file(file)
    return None


def verify_run(run_dir: Path) -> list[Verdict]:
    """Verdicts for every checkpoint of a run, oldest first."""
    found = list_checkpoints(run_dir)
    return [_verdict(path, older_has_manifest=any((p / MANIFEST).exists() for p in found[:i])) for i, path in enumerate(found)]


def _verdict(path: Path, *, older_has_manifest: bool) -> Verdict:
    """`verify_checkpoint`, plus the run's history: a checkpoint without a manifest that is newer
    than one with a manifest lost it (this version always writes one), so it is damaged."""
    verdict = verify_checkpoint(path)
    if verdict.status == "unverified" and older_has_manifest:
        return Verdict(path, "damaged", [f"{MANIFEST} is missing (an older checkpoint of this run has one)"])
    return verdict


def rng_state() -> dict[str, Any]:
    """Every RNG the training process draws from (loader workers are seeded by position)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    rank: int,
    barrier: Callable[[], None],
    weights: dict[str, dict[str, torch.Tensor]],
    shared: dict[str, Any],
    per_rank: dict[str, Any],
    keep: int,
    write_files: Callable[[Path], None] = lambda tmp: None,
    first_error: Callable[[str], str] = lambda error: error,
) -> Path:
    """Write checkpoint `step` from every rank (all ranks must call this together).

    `write_files(tmp)` runs on every rank, for state that writes itself (DeepSpeed engines).
    `first_error(reason)` is a collective: every rank passes its own failure ("" if none) and gets
    the lowest failing rank's. It replaces the barriers after each phase, so a write that fails on
    one rank (a full disk on one node) stops every rank at once with the same line, instead of
    leaving the others at a barrier until train.dist_timeout_s."""
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    failed = _attempt(lambda: _prepare(tmp) if rank == 0 else None)
    try:
        barrier()
        if failed is None:
            failed = _attempt(lambda: _write_own(tmp, step, rank, weights, shared, per_rank, write_files))
        _settle(first_error(_reason(failed, tmp, rank)), failed, run_dir, tmp, final, rank)
        if rank == 0:  # last: a folder with a manifest was written whole
            failed = _attempt(lambda: _commit(tmp, final, root, step))
        _settle(first_error(_reason(failed, tmp, rank)), failed, run_dir, tmp, final, rank)
    finally:
        # The failure's traceback holds this frame, which holds the failure: a cycle that would keep
        # the caller's frames (and files they have mapped) alive until the next garbage collection.
        failed = None
    if rank == 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _prepare(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)


def _write_own(tmp: Path, step: int, rank: int, weights: dict[str, dict[str, torch.Tensor]], shared: dict[str, Any],
               per_rank: dict[str, Any], write_files: Callable[[Path], None]) -> None:
    """This rank's part: DeepSpeed's files first (their writer holds collectives of its own, so
    every rank must reach it), then rank 0 the shared state and each rank its own file, fsynced;
    nothing non-finite is written (checked before the first of gannet's own files)."""
    write_files(tmp)
    require_finite(per_rank, f"rank {rank}'s state")
    if rank == 0:
        require_finite(weights, "the weights")
        require_finite(shared, "the shared state")
        for name, tensors in weights.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        save_state(shared, tmp / "shared")
    save_state(per_rank, tmp / f"rank{rank}")
    _test_full_disk("GANNET_TEST_FULL_DISK", f"{rank}:{step}", tmp)
    _test_pause("GANNET_TEST_SLOW_CHECKPOINT")
    for path in tmp.rglob("*"):
        if path.is_file() and (path.name.startswith(f"rank{rank}.") or rank == 0):
            _fsync(path)


def _commit(tmp: Path, final: Path, root: Path, step: int) -> None:
    write_manifest(tmp, step)
    _fsync(tmp)
    if final.exists():  # the same step saved again after a resume: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)


def _attempt(action: Callable[[], None]) -> Exception | None:
    """Run `action`; its exception, or None. Every rank goes on to the agreement either way."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - settled on every rank by _settle
        return exc
    return None


def _is_full_disk(exc: BaseException, folder: Path) -> bool:
    """Whether a write failed for want of space. safetensors and torch.save (DeepSpeed's files)
    raise their own exception types (torch's says only "unexpected pos ..."), so when the error
    itself does not say, the filesystem is asked: under 1 MiB left counts as full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(exc):
        return True
    try:
        stats = os.statvfs(folder if folder.exists() else folder.parent)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < CHUNK


def _reason(exc: Exception | None, tmp: Path, rank: int) -> str:
    """What this rank tells the others about its write: "" if it succeeded, else why it failed,
    in a few words (with the rank where more than one process writes)."""
    if exc is None:
        return ""
    if isinstance(exc, NonfiniteState):
        why = str(exc)
    elif _is_full_disk(exc, tmp):
        why = "No space left on device"
    elif isinstance(exc, (OSError, SafetensorError)):
        why = getattr(exc, "strerror", None) or str(exc)
    else:
        why = f"{type(exc).__name__}: {exc}".splitlines()[0]
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    return f"{why} (on rank {rank})" if distributed else why


def _settle(reason: str, own: Exception | None, run_dir: Path, tmp: Path, final: Path, rank: int) -> None:
    """After the agreement: nothing to do if every rank succeeded. Otherwise every rank stops here:
    rank 0 removes the half-written folder, and each rank raises the same one line saying why and
    what is still there. A state that holds NaN or Inf raises `NonfiniteCheckpoint` on every rank
    (the loop rolls back). An exception that is not an I/O failure is a bug: the rank where it
    happened raises it with its traceback."""
    if not reason:
        return
    expected = (OSError, SafetensorError, NonfiniteState)
    if own is not None and not _is_full_disk(own, tmp) and not isinstance(own, expected):
        raise own
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if reason.startswith(NONFINITE):
        raise NonfiniteCheckpoint(f"checkpoint {final.name} not written: {reason}") from own
    previous = [p for p in list_checkpoints(run_dir) if p != final and verify_checkpoint(p).status != "damaged"]
    kept = f"the latest complete checkpoint ({previous[-1]}) is intact" if previous else "no earlier checkpoint exists"
    raise CheckpointError(f"could not write checkpoint {final}: {reason}; {kept}") from own


def _test_full_disk(variable: str, where: str, folder: Path) -> None:
    """Test hook: `variable`=RANK:STEP makes that rank find its disk full while writing that step's
    checkpoint (one node's disk, say), after its files are written, before they are fsynced."""
    if os.environ.get(variable) == where:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder))


def _test_pause(variable: str) -> None:
    """Test hook: sleep for the seconds in `variable`, so a test's SIGKILL can land mid-write."""
    seconds = float(os.environ.get(variable, "0") or 0)
    if seconds > 0:
        import time

        time.sleep(seconds)


def load_checkpoint(path: Path, rank: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, Any] | None]:
    """(weights per network, shared state, this rank's state or None if the run had fewer ranks).
    An unreadable file (an unverified checkpoint can hold one) is one clear error, not a traceback."""
    try:
        shared = load_state(path / "shared")
        weights = {name: load_file(str(path / f"{name}.safetensors")) for name in shared["networks"]}
        own = path / f"rank{rank}.json"
        return weights, shared, load_state(path / f"rank{rank}") if own.exists() else None
    except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
