"""The divergence guard: when has a run diverged, so that it must go back to its last good checkpoint?

Two kinds of divergence end in the loop's one `roll_back` phase (gannet.trainer.loop):

- Non-finite: the engine skips every optimizer step whose loss, gradient (or gradient squared:
  Adam's second moment) or buffer is NaN or Inf, on every rank (gannet.trainer.engine.distributed);
  `train.max_nonfinite` skipped steps in a row are a divergence.
- Finite: a learning rate far too high drives the losses to 1e21 while every number stays finite.
  Each watched value (every `loss_*` a recipe reports, and `d_scale`, the scale of D's raw outputs)
  is compared with robust statistics of its own last `train.spike_window` steps. On
  y = log(1 + |value|), a step is flagged when y exceeds the window's median by more than
  `spike_threshold` MADs (scaled to a standard deviation) and by more than log(`spike_ratio`):
  the log makes one test fit losses of 0.3 and of 30 alike; the 1 keeps a hinge loss that wanders
  around 0 from looking like a thousand-fold jump; the MAD scales the test to the series' own
  noise; the ratio is the floor where the history is flat (the first steps of a run). Flagged
  values stay out of the history, so a divergence that lasts stays flagged instead of becoming
  the new normal, and `train.max_spikes` flagged steps in a row are a divergence. Only rises
  count: a loss that falls is not diverging.

It lives beside the loop, not in the engine: it reads what the loop logs (each value averaged over
ranks, so every rank takes the same decision), never gradients or processes. `gannet eval` replays
the same detector over a run's logged history (gannet.trainer.evaluation.evaluate).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from gannet.trainer.config.schema import TrainConfig

log = logging.getLogger("gannet")

MAD_TO_STD = 1.4826  # a normal distribution's standard deviation is 1.4826 x its MAD


def watched(scalars: Mapping[str, float]) -> dict[str, float]:
    """The values the spike detector watches among a step's scalars: the losses and D's output scale."""
    return {k: v for k, v in scalars.items() if k.startswith("loss_") or k == "d_scale"}


@dataclass
class Spike:
    """One watched value flagged at one step, with the history it was judged against."""

    key: str
    value: float
    median: float  # of |value| over the history
    steps: int  # in the history

    def text(self) -> str:
        return f"{self.key} {self.value:.3g} (median {self.median:.3g} over its last {self.steps} steps)"


class SpikeDetector:
    """Median and MAD of log(1 + |value|) over each watched series' last `window` unflagged steps."""

    def __init__(self, window: int, threshold: float, ratio: float):
        self.window, self.threshold, self.log_ratio = window, threshold, math.log(ratio)
        self.history: dict[str, deque[float]] = {}

    def check(self, values: Mapping[str, float]) -> list[Spike]:
        """The spikes among this step's values; the values join the history only if there are none.
        Non-finite values are the non-finite guard's business: neither judged nor kept."""
        if not self.window:
            return []
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        spikes = [spike for key, value in finite.items() if (spike := self.judge(key, value)) is not None]
        if not spikes:
            for key, value in finite.items():
                self.history.setdefault(key, deque(maxlen=self.window)).append(math.log1p(abs(value)))
        return spikes

    def judge(self, key: str, value: float) -> Spike | None:
        """`value` as a spike of series `key`, or None (also while the series has no history)."""
        margin, median = self.margin(key, value)
        if margin is None or margin <= 1:
            return None
        return Spike(key, value, math.expm1(median), len(self.history[key]))

    def margin(self, key: str, value: float) -> tuple[float | None, float]:
        """How far `value` rises over its history, in units of the bar it must clear (> 1: a
        spike), and the history's median of log(1 + |value|). (None, 0) without history."""
        past = self.history.get(key)
        if not past:
            return None, 0.0
        ys = np.fromiter(past, dtype=np.float64)
        median = float(np.median(ys))
        spread = MAD_TO_STD * float(np.median(np.abs(ys - median)))
        return (math.log1p(abs(value)) - median) / max(self.log_ratio, self.threshold * spread), median

    def state_dict(self) -> dict[str, list[float]]:
        return {key: list(values) for key, values in self.history.items()}

    def load_state_dict(self, state: Mapping[str, list[float]]) -> None:
        self.history = {key: deque(values, maxlen=self.window) for key, values in state.items()}


@dataclass
class Divergence:
    """Why the run must roll back: `kind` is nonfinite, spike or state (a checkpoint refused)."""

    kind: str
    what: str


class Watch:
    """The run's health step by step: skipped (non-finite) steps in a row, flagged steps in a row,
    and the counters the dashboards show (train/spikes, train/rollbacks). `observe` says when the
    run has diverged; `give_up` whether it may still roll back."""

    def __init__(self, train: TrainConfig, *, speaks: bool):
        self.cfg, self.speaks = train, speaks
        self.detector = SpikeDetector(train.spike_window, train.spike_threshold, train.spike_ratio)
        self.nonfinite_seen, self.nonfinite_streak, self.spike_streak = 0, 0, 0
        self.spikes, self.rollbacks, self.attempt_rollbacks = 0, 0, 0
        self.last_target = ""  # the checkpoint (or the start) of this attempt's latest rollback

    def observe(self, step: int, scalars: Mapping[str, float], nonfinite_steps: int) -> Divergence | None:
        """One step's verdict from its rank-averaged scalars and the engine's count of skipped steps."""
        skipped, self.nonfinite_seen = nonfinite_steps > self.nonfinite_seen, nonfinite_steps
        self.nonfinite_streak = self.nonfinite_streak + 1 if skipped else 0
        if self.nonfinite_streak >= self.cfg.max_nonfinite:
            return Divergence("nonfinite", f"{self.nonfinite_streak} steps in a row with a non-finite loss or gradient, "
                                           f"up to step {step} (their updates were skipped: no weight holds a non-finite value)")
        spikes = self.detector.check(watched(scalars))  # a NaN loss of a skipped step is neither spike nor history
        self.spike_streak = self.spike_streak + 1 if spikes else 0
        if not spikes:
            return None
        self.spikes += 1
        said = "; ".join(spike.text() for spike in spikes)
        if self.speaks:
            log.warning("spike at step %d (%d in a row): %s", step, self.spike_streak, said)
        if self.spike_streak >= self.cfg.max_spikes:
            return Divergence("spike", f"{self.spike_streak} steps in a row with a loss spike, up to step {step} ({said})")
        return None

    @property
    def calm(self) -> bool:
        """Neither a spike nor a skipped step at the latest step: its state may be kept as a
        checkpoint to roll back to (one network may have stepped on while the other skipped)."""
        return self.spike_streak == 0 and self.nonfinite_streak == 0

    def give_up(self, divergence: Divergence) -> str:
        """Why the run stops instead of rolling back ("" = it rolls back)."""
        if divergence.kind == "nonfinite" and self.cfg.on_nonfinite == "stop":
            return "train.on_nonfinite=stop"
        if self.attempt_rollbacks >= self.cfg.max_rollbacks:
            if not self.attempt_rollbacks:
                return "train.max_rollbacks=0"
            return (f"it diverged again after rolling back to {self.last_target} "
                    f"({self.attempt_rollbacks} rollback(s), train.max_rollbacks={self.cfg.max_rollbacks})")
        return ""

    def rolled_back(self, target: str) -> None:
        self.rollbacks, self.attempt_rollbacks, self.last_target = self.rollbacks + 1, self.attempt_rollbacks + 1, target
        self.nonfinite_streak, self.spike_streak = 0, 0

    def state_dict(self) -> dict[str, Any]:
        """What exact resume needs: the detector's history, and the counters the dashboards show."""
        return {"history": self.detector.state_dict(), "spikes": self.spikes, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: Mapping[str, Any] | None, *, counters: bool = True) -> None:
        """Back to a checkpoint's history; its counters too, unless rolling back (they only grow)."""
        self.detector.load_state_dict(state["history"] if state else {})
        if counters and state:
            self.spikes, self.rollbacks = state["spikes"], state["rollbacks"]
        self.nonfinite_streak, self.spike_streak = 0, 0
