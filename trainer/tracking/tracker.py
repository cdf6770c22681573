"""Where metrics go (rank 0 only): metrics.jsonl, Weights & Biases, and the terminal.

metrics.jsonl is the record gannet itself trusts; W&B mirrors it. W&B runs offline by default
(`wandb sync RUN/wandb/offline-run-*` uploads later) and keeps one run id per run directory, so a
resumed or requeued job continues the same W&B run.

Two rules keep the dashboard honest and harmless:

- One history, each step once, across attempts. A killed attempt (SIGKILL, or a preemption's
  SIGTERM, which also ends W&B's service process) leaves W&B's log holding the steps up to
  some point p, while training resumes from its last checkpoint s. On resume the tracker reads
  what earlier attempts persisted (gannet.trainer.tracking.wandb_files): steps in (p, s] are sent again from
  metrics.jsonl (scalars), and re-trained steps <= p are not sent twice.
- W&B lives in a background thread (init, log, finish), so a slow or unreachable server never
  stalls the loop (an online run that cannot reach it goes offline); any other W&B error is logged
  once and switches W&B off: training never fails for it.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gannet.trainer.config.loader import config_to_dict
from gannet.trainer.config.schema import Config

log = logging.getLogger("gannet")

GROUPS = ("train", "eval", "perf", "data", "samples")  # metric key prefixes, each plotted against `step`
# on the progress line beside the losses: the step's speed, its wait for data, the loader's capacity
PROGRESS_SPEED = {"perf/images_per_s": "img/s", "data/wait_ms": "wait_ms", "data/loader_images_per_s": "loader_img/s"}
INIT_TIMEOUT_S = 30.0  # an online run that cannot reach its server by then goes offline
FINISH_TIMEOUT_S = 60.0  # longest the end of training waits for W&B (a server that went away, say)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of RUN/metrics.jsonl, in order (training and eval records share the file)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@dataclass
class Media:
    """A W&B media value, built in the W&B thread: `image` (a path, PIL image or array), `histogram`
    (an array) or `table` (columns, rows whose cells may be images)."""

    kind: str
    value: Any
    columns: tuple[str, ...] = ()


def shows_bar(progress: str) -> bool:
    """log.progress: a progress bar, or a line per logging step; auto = a bar on a terminal (stderr)."""
    return progress == "bar" or (progress == "auto" and sys.stderr.isatty())


class Tracker:
    """Rank 0's metric sink. Other ranks build one with `enabled=False`: every call is a no-op."""

    def __init__(self, run_dir: Path, cfg: Config, *, enabled: bool, start_step: int):
        self.enabled = enabled
        self.run_dir = run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        self.wandb: WandbWriter | None = None
        self.bar = None
        if not enabled:
            return
        self._truncate_after(start_step)
        if shows_bar(cfg.log.progress):
            self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc=cfg.name, dynamic_ncols=True)
        if cfg.log.wandb != "disabled":
            run_id = wandb_run_id(run_dir)
            self.wandb = WandbWriter(run_dir, cfg, run_id, persisted=self._wandb_persisted(run_id))
            self._backfill()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records a killed run wrote after its last checkpoint: one history, no repeats."""
        if not self.jsonl.exists():
            return
        keep = [record for record in read_metrics(self.run_dir) if record["step"] <= step]
        tmp = self.jsonl.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in keep))
        os.replace(tmp, self.jsonl)

    def rewind(self, step: int) -> None:
        """A rollback to `step`: metrics.jsonl drops what came after it (W&B keeps its first values
        of the re-trained steps: its history only moves forward)."""
        if self.enabled:
            self._truncate_after(step)
            if self.bar is not None:
                self.bar.n = step
                self.bar.refresh()

    def _wandb_persisted(self, run_id: str) -> int:
        """The last step earlier attempts of this W&B run got onto disk (read before this one starts)."""
        from gannet.trainer.tracking.wandb_files import persisted_step  # imports wandb: only runs that use it pay

        try:
            return persisted_step(self.run_dir, run_id)
        except Exception as exc:  # an unreadable log: assume it holds what metrics.jsonl holds
            log.warning("could not read the earlier W&B log of this run (%s); not re-sending its steps", exc)
            return read_metrics(self.run_dir)[-1]["step"] if self.jsonl.exists() else 0

    def _backfill(self) -> None:
        """Send W&B the logged steps earlier attempts did not persist (none on a fresh run)."""
        if not self.jsonl.exists():
            return
        rows: dict[int, dict[str, Any]] = {}
        for record in read_metrics(self.run_dir):
            rows.setdefault(record.pop("step"), {}).update(record)
        for step in sorted(rows):
            self._send(step, rows[step])

    def _send(self, step: int, values: dict[str, Any]) -> None:
        if self.wandb is not None and step > self.wandb.persisted:
            self.wandb.send(step, values)

    def log(self, step: int, metrics: dict[str, float], histograms: dict[str, Any] | None = None) -> None:
        """Scalars to metrics.jsonl and W&B; `histograms` (arrays or tensors of values) to W&B only."""
        if not self.enabled:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._send(step, metrics)
        self._send(step, {k: Media("histogram", np.asarray(v, dtype=np.float32)) for k, v in (histograms or {}).items()})
        short = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("train/") and not k.startswith("train/lr")}
        speed = {name: f"{metrics[k]:.0f}" for k, name in PROGRESS_SPEED.items() if k in metrics}  # is the loader keeping up?
        if self.bar is not None:
            self.bar.set_postfix({**{k: f"{v:.3f}" for k, v in short.items()}, **speed}, refresh=False)
        else:
            log.info("step %d  %s", step, "  ".join([*(f"{k} {v:.4f}" for k, v in short.items()), *(f"{k} {v}" for k, v in speed.items())]))

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log_image(self, step: int, key: str, path: Path) -> None:
        if self.enabled:
            self._send(step, {key: Media("image", str(path))})

    def log_table(self, step: int, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A W&B table (e.g. text-to-image prompts beside their samples). Cells are numbers, strings,
        or images: a PIL image, an HxW / HxWxC uint8 array, or a Path to an image file."""
        if self.enabled:
            self._send(step, {key: Media("table", [list(row) for row in rows], tuple(columns))})

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.close()


class WandbWriter:
    """One W&B run, driven from a background thread: `send` only queues, so the loop never waits."""

    def __init__(self, run_dir: Path, cfg: Config, run_id: str, *, persisted: int):
        self.run_dir = run_dir
        self.mode = cfg.log.wandb
        self.persisted = persisted  # the last step earlier attempts of this run got onto disk: not sent again
        self.init_kwargs = dict(
            project=cfg.log.wandb_project, name=cfg.name, id=run_id, resume="allow", dir=str(run_dir),
            config={**config_to_dict(cfg), "git": git_state(), "slurm_job_id": os.environ.get("SLURM_JOB_ID")},
        )
        self.started = False  # whether a W&B run began (set by the thread)
        # Every process W&B needs (git above, W&B's service process here) is started now, in the main
        # thread: a process spawned from another thread while the loop forks its loader workers can
        # hang before it starts (seen here: `git` never ran, so W&B never began).
        try:
            import wandb

            wandb.setup()
        except Exception as exc:
            log.warning("W&B could not start its service (%s); continuing without W&B", exc)
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="gannet-wandb", daemon=True)
        self.thread.start()

    def send(self, step: int, row: dict[str, Any]) -> None:
        self.queue.put((step, row))

    def close(self, timeout: float = FINISH_TIMEOUT_S) -> None:
        self.queue.put(None)
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("W&B did not finish within %.0f s; training is done and does not wait for it", timeout)
        elif self.mode == "offline" and self.started:
            log.info("W&B run saved offline; upload it with: wandb sync %s", self.run_dir / "wandb" / "offline-run-*")

    def _run(self) -> None:
        run = self._start()
        self.started = run is not None
        while (item := self.queue.get()) is not None:
            if run is None:
                continue
            step, row = item
            try:
                import wandb

                run.log({"step": step, **{k: _to_wandb(v, wandb) for k, v in row.items()}}, step=step)
            except Exception as exc:
                log.warning("W&B disabled after an error: %s", exc)
                run = None
        if run is not None:
            try:
                run.finish()
                import wandb

                wandb.teardown()  # stops W&B's service process, which closes the run's log: only then is it all on disk
            except Exception as exc:
                log.warning("W&B finish failed: %s", exc)

    def _start(self) -> Any:
        """The W&B run; online falls back to offline when the server cannot be reached or refuses."""
        try:
            import wandb

            settings = wandb.Settings(console="off", silent=True, init_timeout=INIT_TIMEOUT_S)
            run = wandb.init(**self.init_kwargs, mode=self.mode, settings=settings)
            run.define_metric("step")
            for group in GROUPS:
                run.define_metric(f"{group}/*", step_metric="step")
            return run
        except Exception as exc:  # no network, bad key, broken install: train without the dashboard
            if self.mode == "online":
                log.warning("W&B online failed (%s); logging offline instead, upload later with wandb sync", exc)
                self.mode = "offline"
                try:
                    wandb.teardown()  # the failed attempt still holds the run id in W&B's service
                except Exception:
                    pass  # its service may be the part that failed; a new one starts either way
                return self._start()
            log.warning("W&B disabled for this run: %s", exc)
            return None


def wandb_run_id(run_dir: Path) -> str:
    """The run directory's W&B run id, made on first use: every attempt of the run continues it."""
    id_file = run_dir / "wandb_id.txt"
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip()


def _to_wandb(value: Any, wandb: Any) -> Any:
    if not isinstance(value, Media):
        return value
    if value.kind == "histogram":
        return wandb.Histogram(value.value)
    if value.kind == "table":
        return wandb.Table(columns=list(value.columns), data=[[_cell(c, wandb) for c in row] for row in value.value])
    return wandb.Image(value.value)


def _cell(value: Any, wandb: Any) -> Any:
    if isinstance(value, Path) or isinstance(value, np.ndarray) or type(value).__module__.startswith("PIL."):
        return wandb.Image(str(value) if isinstance(value, Path) else value)
    return value


def git_state() -> dict[str, Any]:
    """The code's git commit and whether it had uncommitted changes (None outside a git checkout)."""
    code = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(code), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}
