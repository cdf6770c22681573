"""Where metrics go (rank 0 only): metrics.jsonl, Weights & Biases, and the terminal.

metrics.jsonl is the record gannet itself trusts; W&B mirrors it. W&B runs offline by default
(`wandb sync RUN/wandb/offline-run-*` uploads later) and keeps one run id per run directory, so a
resumed job continues the same W&B run. Any W&B failure is logged once and W&B is switched off:
a dashboard never stops or stalls training.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

from trainer.config import Config, config_to_dict

log = logging.getLogger("gannet")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of RUN/metrics.jsonl, in order (training and eval records share the file)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


class Tracker:
    """Rank 0's metric sink. Other ranks build one with `enabled=False`: every call is a no-op."""

    def __init__(self, run_dir: Path, cfg: Config, *, enabled: bool, start_step: int):
        self.enabled = enabled
        self.run_dir = run_dir
        self.jsonl = run_dir / "metrics.jsonl"
        self.wandb = None
        self.bar = None
        if not enabled:
            return
        self._truncate_after(start_step)
        progress = cfg.log.progress
        if progress == "bar" or (progress == "auto" and sys.stderr.isatty()):
            self.bar = tqdm(total=cfg.train.steps, initial=start_step, desc=cfg.name, dynamic_ncols=True)
        if cfg.log.wandb != "disabled":
            self._start_wandb(cfg)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records a killed run wrote after its last checkpoint: one history, no repeats."""
        if not self.jsonl.exists():
            return
        keep = [record for record in read_metrics(self.run_dir) if record["step"] <= step]
        tmp = self.jsonl.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in keep))
        os.replace(tmp, self.jsonl)

    def _start_wandb(self, cfg: Config) -> None:
        id_file = self.run_dir / "wandb_id.txt"
        if not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        try:
            import wandb

            self.wandb = wandb.init(
                project=cfg.log.wandb_project, name=cfg.name, id=id_file.read_text().strip(), resume="allow",
                dir=str(self.run_dir), mode=cfg.log.wandb, config=config_to_dict(cfg),
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as exc:  # no network, bad key, broken install: train without the dashboard
            log.warning("W&B disabled for this run: %s", exc)

    def _wandb_call(self, fn: str, *args: Any, **kwargs: Any) -> None:
        if self.wandb is None:
            return
        try:
            getattr(self.wandb, fn)(*args, **kwargs)
        except Exception as exc:
            log.warning("W&B disabled after an error: %s", exc)
            self.wandb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self._wandb_call("log", metrics, step=step)
        short = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("train/") and not k.startswith("train/lr")}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in short.items()}, refresh=False)
        else:
            log.info("step %d  %s", step, "  ".join(f"{k} {v:.4f}" for k, v in short.items()))

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def log_image(self, step: int, key: str, path: Path) -> None:
        if not self.enabled or self.wandb is None:
            return
        import wandb

        self._wandb_call("log", {key: wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._wandb_call("finish")
