"""Non-finite losses and dead ranks: a NaN skips the update on every rank and leaves weights,
optimizer state and the EMA as they were; a run that keeps diverging rolls back to its last
checkpoint with lower learning rates, or stops with one line; a rank that dies makes the others
exit with a clear error instead of hanging, and the run resumes."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gannet.trainer.loop
from gannet.trainer.config.loader import load_config
from gannet.trainer.data.stream import open_stream, stream_urls
from gannet.trainer.engine import preemption
from gannet.trainer.engine.distributed import free_port
from gannet.trainer.engine.setup import setup
from gannet.trainer.errors import GannetError
from gannet.trainer.evaluation.evaluate import Evaluator
from gannet.trainer.tracking.tracker import read_metrics as metrics
from tests.conftest import BIN, REPO, process_env, run, tiny_overrides


class Poisoned:
    """The real stream (position and all), with the images of the batches numbered in `bad` made
    NaN; batches are numbered from 1 by `count`, which may be shared by reopened streams."""

    def __init__(self, stream, bad, count: dict[str, int] | None = None):
        self.stream, self.bad, self.count = stream, bad, count if count is not None else {"n": 0}
        self.position = stream.position

    def __next__(self) -> dict[str, torch.Tensor]:
        batch = next(self.stream)
        self.count["n"] += 1
        return {**batch, "image": torch.full(batch["image"].shape, float("nan"))} if self.count["n"] in self.bad else batch


def test_a_nan_batch_skips_the_update_and_leaves_weights_optimizer_and_ema_untouched(plugin_recipe, small_shards, tmp_path):
    cfg = load_config("lsgan_mnist", tiny_overrides(small_shards, tmp_path, **{"recipe.name": plugin_recipe}))
    job = setup(cfg)
    engine = job.engine
    engine.data = Poisoned(open_stream(stream_urls(cfg.data), cfg.data, rank=0, world=1, seed=0), bad={2})
    snapshot = lambda: {name: [p.clone() for p in engine.module(name).parameters()] for name in engine.nets}  # noqa: E731
    job.recipe.iteration(engine)  # a clean step: Adam's state exists from here on
    before, adam = snapshot(), [s["exp_avg"].clone() for s in engine.optimizers["D"].state.values()]
    metrics_bad = job.recipe.iteration(engine)  # D's real batch is NaN
    assert not math.isfinite(metrics_bad["loss_d"].item())
    assert engine.skipped == {"D"} and engine.nonfinite_steps == 1
    assert all(torch.isfinite(b).all() for b in engine.module("D").buffers())  # statistics back to the last good step
    after = snapshot()
    assert all(torch.equal(a, b) for a, b in zip(before["D"], after["D"])), "D moved on a NaN loss"
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(adam, engine.optimizers["D"].state.values()))
    assert not all(torch.equal(a, b) for a, b in zip(before["G"], after["G"]))  # G's loss was finite: G stepped
    job.recipe.iteration(engine)
    assert engine.skipped == set() and engine.nonfinite_steps == 1
    # weights and BatchNorm statistics (the NaN batch went through D's forward) hold no NaN
    assert all(torch.isfinite(t).all() for net in engine.nets.values() for t in net.state_dict().values())


def test_nan_noise_skips_g_too_and_the_ema_does_not_follow(plugin_recipe, small_shards, tmp_path):
    cfg = load_config("lsgan_mnist", tiny_overrides(small_shards, tmp_path, **{"recipe.name": plugin_recipe, "recipe.ema_kimg": 1}))
    job = setup(cfg)
    engine = job.engine
    engine.data = open_stream(stream_urls(cfg.data), cfg.data, rank=0, world=1, seed=0)
    job.recipe.iteration(engine)
    ema = [p.clone() for p in engine.nets["G_ema"].parameters()]
    engine.noise = lambda n, dim: torch.full((n, dim), float("nan"))  # both losses non-finite
    job.recipe.iteration(engine)
    assert engine.skipped == {"D", "G"} and engine.nonfinite_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(ema, engine.nets["G_ema"].parameters()))


def test_a_nan_on_one_rank_skips_the_step_on_both(tmp_path):
    out = tmp_path / "w.st"
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(REPO / "tests" / "dist_harness.py"),
         str(out), "3", "train.cpu=true"], env=process_env(HARNESS_NAN_BATCH="1:1"))
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["nonfinite_steps"] for r in ranks] == [1, 1]  # rank 0's own batch was finite: it skipped by agreement
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and math.isfinite(ranks[0]["checksum"])  # still in step


def test_deepspeed_non_finite_gradients_or_micro_batch_skip_the_accumulated_step_on_both_ranks(tmp_path):
    """ZeRO-2 on two processes, two micro-batches per step. Step 2: rank 1's D gradient from its
    second micro-batch is infinite while every loss is finite (an overflow in backward); step 3:
    rank 0's second micro-batch is NaN. Each whole accumulated step is dropped on both ranks (one
    all-reduce decides, DeepSpeed's own overflow path discards it): D's weights, fp32 master
    weights and Adam moments exactly as before, counted, and DeepSpeed's micro-step and step
    counters in step with gannet's."""
    out = tmp_path / "w.st"
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(REPO / "tests" / "dist_harness.py"),
         str(out), "4", "train.cpu=true", "train.mixed_precision=no", "train.strategy=deepspeed", "optim.g.zero_stage=2",
         "optim.d.zero_stage=2", "train.grad_accum=2"], env=process_env(HARNESS_INF_GRAD="3:1", HARNESS_NAN_BATCH="5:0"))
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["nonfinite_steps"] for r in ranks] == [2, 2] and [r["untouched"] for r in ranks] == [[True, True]] * 2
    assert ranks[0]["checksum"] == ranks[1]["checksum"] and math.isfinite(ranks[0]["checksum"])
    for r in ranks:  # (DeepSpeed's micro steps, steps, skipped steps, gannet's micro-batches)
        assert r["deepspeed"] == {"G": [8, 4, 0, 8], "D": [8, 4, 2, 8]}


def train_through_a_poisoned_window(cfg, monkeypatch, bad: range) -> Path:
    """`gannet train` in this process, with the stream's batches `bad` (counted over the whole run,
    across reopenings after a rollback) NaN: a divergence the guard must survive or report."""
    count = {"n": 0}
    monkeypatch.setattr(gannet.trainer.loop, "open_stream", lambda *args, **kwargs: Poisoned(open_stream(*args, **kwargs), bad, count))
    return gannet.trainer.loop.train(cfg)


def test_a_divergence_rolls_back_to_the_last_checkpoint_with_lower_learning_rates(small_shards, tmp_path, monkeypatch, caplog):
    cfg = load_config("lsgan_mnist", tiny_overrides(small_shards, tmp_path / "run", **{
        "train.steps": 30, "train.checkpoint_every": 10, "train.max_nonfinite": 3, "data.num_workers": 0}))
    run_dir = train_through_a_poisoned_window(cfg, monkeypatch, bad=range(15, 18))  # iterations 15-17
    assert "rolled back to step-00000010 (step 10), learning rates x0.5" in caplog.text
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]  # one history: the diverged steps 11-17 replaced
    assert rows[1]["train/lr_d"] == pytest.approx(2e-4) and rows[-1]["train/lr_d"] == pytest.approx(1e-4)
    assert rows[-1]["train/nonfinite_steps"] == 3
    weights = load_file(str(run_dir / "checkpoints" / "step-00000030" / "D.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_a_run_that_diverges_again_stops_with_one_line(small_shards, tmp_path, monkeypatch):
    cfg = load_config("lsgan_mnist", tiny_overrides(small_shards, tmp_path / "run", **{
        "train.steps": 30, "train.checkpoint_every": 10, "train.max_nonfinite": 3, "data.num_workers": 0}))
    with pytest.raises(GannetError) as info:
        train_through_a_poisoned_window(cfg, monkeypatch, bad=range(15, 10_000))
    message = str(info.value)
    assert "\n" not in message and message.startswith("training diverged: 3 steps in a row with a non-finite loss")
    assert "diverged again after rolling back to step-00000010" in message


def test_a_dead_rank_makes_the_other_exit_with_a_clear_error_and_the_run_resumes(small_shards, tmp_path):
    """Two processes started as Slurm's srun would (no launcher watching them): kill rank 1, and
    rank 0 must not wait forever in a collective."""
    run_dir, port = tmp_path / "run", str(free_port())
    overrides = tiny_overrides(small_shards, run_dir, **{"train.steps": 400, "train.checkpoint_every": 10,
                                                          "train.cpu": "true", "train.dist_timeout_s": 30})
    procs = [subprocess.Popen([sys.executable, "-m", "gannet", "train", "lsgan_mnist", *overrides], cwd=REPO,
                              env=process_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                              MASTER_PORT=port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for r in (0, 1)]
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step-00000010").exists():
        assert procs[0].poll() is None and time.time() < deadline, "the run ended before a rank could be killed"
        time.sleep(0.1)
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed_at = time.time()
    _, stderr = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 1 and time.time() - killed_at < 60
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("gannet: error: rank 0 lost contact with the other processes") and "resume=auto" in last
    procs[1].wait()
    run([sys.executable, "-m", "gannet", "train", "lsgan_mnist",
         *tiny_overrides(small_shards, run_dir, **{"train.steps": 20}), "resume=auto"])
    assert metrics(run_dir)[-1]["step"] == 20


@pytest.mark.parametrize("phase", ["evaluation", "sampling"])
def test_usr2_during_evaluation_or_sampling_saves_stops_and_resumes(phase, mnist_shards, tmp_path, monkeypatch):
    """A Slurm job's warning signal (USR2, which gannet watches in Slurm jobs) arriving in the middle
    of in-training evaluation or of drawing the sample grid: that work finishes, every rank agrees at
    the step, saves it and stops cleanly; resume=auto trains on to the end."""
    monkeypatch.setattr(preemption, "_watching", False)
    monkeypatch.setattr(preemption, "_requested", False)
    extra = {"train.steps": 20, "train.sample_every": 10, "train.checkpoint_every": 20, "data.num_workers": 0,
             "eval.every": 10 if phase == "evaluation" else 0, "eval.samples": 50}
    cfg = load_config("lsgan_mnist", tiny_overrides(mnist_shards, tmp_path / "run", **extra))
    owner, name = (Evaluator, "score") if phase == "evaluation" else (gannet.trainer.loop, "save_grid")
    original, fired = getattr(owner, name), []

    def signalled(*args, **kwargs):
        if not fired:  # the signal lands inside this phase's work, once
            fired.append(os.kill(os.getpid(), signal.SIGUSR2))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, signalled)
    previous = preemption.watch(signal.SIGUSR2)
    try:
        run_dir = gannet.trainer.loop.train(cfg)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert fired and [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000010"]
    assert metrics(run_dir)[-1]["step"] == 10  # stopped at the step the signal arrived in, with its work done
    monkeypatch.setattr(preemption, "_requested", False)
    gannet.trainer.loop.train(load_config("lsgan_mnist", [*tiny_overrides(mnist_shards, run_dir, **extra), "resume=auto"]))
    assert metrics(run_dir)[-1]["step"] == 20 and (run_dir / "checkpoints" / "step-00000020").is_dir()
