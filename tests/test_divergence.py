"""Divergence that stays finite, and state that must never be kept: a learning rate of 1e4 drives
the losses to 1e21 with every number finite; the spike detector flags it within a few steps, the
run rolls back (to the start when no checkpoint exists yet) with lower learning rates, and after
train.max_rollbacks stops with one line and exit 1, on one process and on two (DDP, ZeRO-2). A
gradient whose square overflows (Adam's second moment) skips the step; a state holding NaN or Inf
is never written as a checkpoint, and one planted in a checkpoint is refused by resume and
`gannet verify`. Healthy runs of every bundled config never trigger the detector."""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gannet.trainer.loop
from gannet.models.recipes.lsgan import LSGAN
from gannet.trainer import cli
from gannet.trainer.checkpoint.statefile import load_state, save_state
from gannet.trainer.checkpoint.store import (
    NonfiniteCheckpoint,
    list_checkpoints,
    nonfinite_files,
    save_checkpoint,
    write_manifest,
)
from gannet.trainer.config.loader import load_config
from gannet.trainer.data.stream import open_stream, stream_urls
from gannet.trainer.engine.distributed import free_port
from gannet.trainer.engine.setup import setup
from gannet.trainer.guard import SpikeDetector, Watch
from gannet.trainer.tracking.tracker import read_metrics as metrics
from tests.conftest import BIN, REPO, process_env, run, tiny_overrides

TINY = {"data.batch_size": 16, "model.g_width": 8, "model.d_width": 8, "train.num_samples": 4, "data.num_workers": 0,
        "train.log_every": 1, "train.sample_every": 1000}
# The run: `gannet train lsgan_mnist optim.d.lr=1e4 optim.g.lr=1e4 train.steps=40 train.checkpoint_every=10`
DIVERGING = {"optim.d.lr": 1e4, "optim.g.lr": 1e4, "train.steps": 40, "train.checkpoint_every": 10, "train.max_rollbacks": 2}
RECIPES = ["lsgan_mnist", "sngan_mnist", "cgan_mnist", "cyclegan_silhouettes"]


def overrides(config: str, small_shards: Path, silhouettes: dict[str, Path] | None, run: Path, **extra: object) -> list[str]:
    """A tiny version of `config` on real shards (CycleGAN: the unpaired silhouettes)."""
    values = {**TINY, **extra}
    if config == "cyclegan_silhouettes":
        values = {"data.shards_b": f"{silhouettes['small']}/b-*.tar", "data.batch_size": 2, "data.shuffle_buffer": 20,
                  "recipe.pool_size": 3, **{f"optim.{n}.decay_from": values.get("train.steps", 30) // 2 for n in "gd"},
                  **{k: v for k, v in values.items() if k != "data.batch_size"}}
        return [f"data.shards={silhouettes['small']}/a-*.tar", *tiny_overrides(small_shards, run, **values)[1:]]
    return tiny_overrides(small_shards, run, **values)


def assert_nothing_saved_is_nonfinite(run: Path) -> None:
    for checkpoint in list_checkpoints(run):
        assert nonfinite_files(checkpoint) == [], checkpoint


def first_spike_step(messages: list[str]) -> int:
    return next(int(m.split()[3]) for m in messages if m.startswith("spike at step "))


@pytest.mark.parametrize("config", RECIPES)
def test_lr_1e4_spikes_roll_back_and_stop_with_one_line(config, small_shards, silhouettes, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    code = cli.main(["train", config, *overrides(config, small_shards, silhouettes, run, **DIVERGING)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, lines
    assert re.match(r"gannet: error: training diverged: 3 steps in a row with a loss spike, up to step \d+ \(.*\); "
                    r"stopped: it diverged again after rolling back to (the start|step-\d+) \(2 rollback\(s\), "
                    r"train.max_rollbacks=2\)\. Lower optim.g.lr/optim.d.lr", lines[0]), lines[0]
    messages = [r.getMessage() for r in caplog.records]
    assert first_spike_step(messages) <= 20
    assert sum("; rolled back to " in m and "learning rates x0.5" in m for m in messages) == 2
    last = metrics(run)[-1]
    assert last["train/rollbacks"] == 2 and last["train/spikes"] >= 6  # 3 flagged steps before each of 3 verdicts
    assert last["train/lr_d"] == pytest.approx(1e4 * 0.25)
    assert_nothing_saved_is_nonfinite(run)


def srun(config: str, extra: list[str], processes: int = 2) -> list[subprocess.CompletedProcess]:
    """`gannet train` on `processes` CPU processes started as Slurm's srun would (no launcher), each
    with its own stderr."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "gannet", "train", config, *extra, "train.cpu=true"], cwd=REPO,
                              env=process_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(processes),
                                              MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(processes)]
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=600), "", p.stderr.read()) for p in procs]


@pytest.mark.parametrize("config, strategy", [("lsgan_mnist", "ddp"), ("sngan_mnist", "zero2")])
def test_lr_1e4_on_two_processes_every_rank_rolls_back_and_stops_alike(config, strategy, small_shards, tmp_path):
    """Each rank judges the same rank-averaged losses, so both roll back at the same steps and stop
    with the same line: DDP, and one DeepSpeed ZeRO-2 engine per network."""
    run = tmp_path / "run"
    extra = {} if strategy == "ddp" else {"train.strategy": "deepspeed", "optim.g.zero_stage": 2, "optim.d.zero_stage": 2}
    results = srun(config, overrides(config, small_shards, None, run, **{**DIVERGING, "train.max_rollbacks": 1, **extra}))
    lasts = [r.stderr.strip().splitlines()[-1] for r in results]
    assert [r.returncode for r in results] == [1, 1] and lasts[0] == lasts[1], [r.stderr[-3000:] for r in results]
    assert lasts[0].startswith("gannet: error: training diverged: 3 steps in a row with a loss spike") and \
        "(1 rollback(s), train.max_rollbacks=1)" in lasts[0]
    assert "Traceback" not in results[0].stderr + results[1].stderr
    assert first_spike_step(results[0].stderr.splitlines()) <= 20
    assert metrics(run)[-1]["train/rollbacks"] == 1
    assert_nothing_saved_is_nonfinite(run)


# -- state that must never be kept -------------------------------------------------------------------

def test_a_gradient_whose_square_overflows_skips_the_step_and_adam_stays_finite(small_shards, tmp_path):
    """A finite loss and a finite gradient of 1e20: its square (Adam's second moment) is Inf in
    float32. The step is skipped and counted, the moments stay as they were."""
    cfg = load_config("lsgan_mnist", tiny_overrides(small_shards, tmp_path, **TINY))
    job = setup(cfg)
    engine = job.engine
    engine.data = open_stream(stream_urls(cfg.data), cfg.data, rank=0, world=1, seed=0)
    job.recipe.iteration(engine)
    moments = [s["exp_avg_sq"].clone() for s in engine.optimizers["D"].state.values()]
    fired = []
    weight = next(engine.module("D").parameters())
    handle = weight.register_hook(lambda g: g if fired else fired.append(1) or g.sign() * 1e20)
    metrics_step = job.recipe.iteration(engine)
    handle.remove()
    assert math.isfinite(metrics_step["loss_d"].item()) and engine.skipped == {"D"} and engine.nonfinite_steps == 1
    assert all(torch.equal(a, s["exp_avg_sq"]) for a, s in zip(moments, engine.optimizers["D"].state.values()))
    job.recipe.iteration(engine)  # and the next, ordinary step is taken
    assert engine.skipped == set() and all(torch.isfinite(s["exp_avg_sq"]).all() for s in engine.optimizers["D"].state.values())


def test_saving_refuses_a_state_that_holds_nan_and_writes_nothing(tmp_path):
    weights = {"G": {"w": torch.tensor([1.0, float("inf")])}}
    with pytest.raises(NonfiniteCheckpoint, match=r"^checkpoint step-00000003 not written: non-finite values in the "
                                                  r"weights: G\.w \(1 of 2\)$"):
        save_checkpoint(tmp_path, 3, rank=0, barrier=lambda: None, weights=weights, shared={}, per_rank={}, keep=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_deepspeeds_writer_refuses_an_optimizer_moment_that_holds_inf(small_shards, tmp_path):
    """DeepSpeed writes its optimizer partitions itself (torch.save, inside its own barriers): the
    check sits in its writer, names the file, and the whole checkpoint is refused."""
    cfg = load_config("lsgan_mnist", tiny_overrides(small_shards, tmp_path / "run", **{
        **TINY, "train.strategy": "deepspeed", "optim.g.zero_stage": 2, "optim.d.zero_stage": 2}))
    job = setup(cfg)
    job.engine.data = open_stream(stream_urls(cfg.data), cfg.data, rank=0, world=1, seed=0)
    job.recipe.iteration(job.engine)
    moments = next(iter(job.engine.optimizers["D"].optimizer.state.values()))
    moments["exp_avg_sq"].view(-1)[0] = float("inf")
    refused = gannet.trainer.loop.save(cfg, job, Watch(cfg.train, speaks=False), 1)
    assert refused is not None and refused.kind == "state"
    assert re.match(r"checkpoint step-00000001 not written: non-finite values in \S*optim_states\.pt: "
                    r"optimizer_state_dict\.\S*exp_avg_sq \(1 of \d+\)", refused.what), refused.what
    assert list_checkpoints(tmp_path / "run") == [] and not list((tmp_path / "run" / "checkpoints").iterdir())
    job.close()


def test_a_state_that_cannot_be_saved_rolls_back_and_is_never_written(small_shards, tmp_path, monkeypatch, caplog):
    """The recipe's state holds a NaN at the step-10 checkpoint only: nothing is written there, the
    run rolls back to step 5 as on a divergence, trains on and saves steps 10 and 15 finite."""
    original, calls = LSGAN.state_dict, {"n": 0}

    def state_dict(self):
        calls["n"] += 1
        return {**original(self), "probe": float("nan") if calls["n"] == 2 else 0.0}

    monkeypatch.setattr(LSGAN, "state_dict", state_dict)
    cfg = load_config("lsgan_mnist", tiny_overrides(small_shards, tmp_path / "run", **{
        **TINY, "train.steps": 15, "train.checkpoint_every": 5, "train.log_every": 5}))
    run = gannet.trainer.loop.train(cfg)
    assert ("training diverged: checkpoint step-00000010 not written: non-finite values in rank 0's state: "
            "recipe.probe (nan); rolled back to step-00000005 (step 5), learning rates x0.5") in caplog.text
    assert [p.name for p in list_checkpoints(run)] == ["step-00000005", "step-00000010", "step-00000015"]
    assert_nothing_saved_is_nonfinite(run)
    assert metrics(run)[-1]["train/rollbacks"] == 1


def test_an_inf_planted_in_an_optimizer_moment_is_refused_by_verify_and_resume(small_shards, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="gannet")
    run = tmp_path / "run"
    args = tiny_overrides(small_shards, run, **{**TINY, "train.steps": 8, "train.checkpoint_every": 4})
    gannet.trainer.loop.train(load_config("lsgan_mnist", args))
    latest = run / "checkpoints" / "step-00000008"
    shared = load_state(latest / "shared")
    moment = shared["engine"]["optimizers"]["G"]["state"][0]["exp_avg_sq"]
    moment.view(-1)[0] = float("inf")
    save_state(shared, latest / "shared")
    write_manifest(latest, 8)  # the manifest rewritten to match: integrity holds, the content does not

    problem = f"shared.safetensors holds non-finite values: engine.optimizers.G.state.0.exp_avg_sq (1 of {moment.numel()})"
    capsys.readouterr()
    assert cli.main(["verify", str(run)]) == 1
    assert capsys.readouterr().out.splitlines() == ["step-00000004: ok", f"step-00000008: DAMAGED: {problem}"]
    gannet.trainer.loop.train(load_config("lsgan_mnist", [*args, "resume=auto"]))
    assert f"checkpoint {latest} is damaged ({problem}): skipped" in caplog.text
    assert f"resumed {run / 'checkpoints' / 'step-00000004'} at step 4" in caplog.text
    assert cli.main(["verify", str(run)]) == 0  # step 8 trained again from step 4, finite


# -- healthy runs never trigger --------------------------------------------------------------------

def test_the_detector_flags_a_jump_but_not_noise_or_a_hinge_loss_around_zero():
    detector = SpikeDetector(window=100, threshold=8.0, ratio=10.0)
    noise = torch.Generator().manual_seed(0)
    for value in (0.5 + 0.2 * torch.randn(200, generator=noise)).tolist():  # noisy LSGAN-like loss
        assert detector.check({"loss_d": value}) == []
    for value in (0.3 * torch.randn(200, generator=noise)).tolist():  # a hinge G loss wandering around 0
        assert detector.check({"loss_g": value}) == []
    (spike,) = detector.check({"loss_d": 3e4, "loss_g": 0.1})
    assert spike.key == "loss_d" and re.match(r"loss_d 3e\+04 \(median 0\.\d+ over its last 100 steps\)$", spike.text())
    assert detector.check({"loss_d": 3e4}) != []  # a lasting divergence stays flagged: it never joined the history


@pytest.mark.parametrize("config", [pytest.param(c, marks=pytest.mark.slow) for c in
                                    ["sngan_mnist", "lsgan_mnist", "gan_mnist", "cgan_mnist", "t2i_mnist", "cyclegan_silhouettes"]])
def test_a_healthy_run_of_each_bundled_config_never_triggers(config, mnist_shards, silhouettes, tmp_path):
    """300 steps of each bundled config as shipped (cyclegan_256 needs data gannet does not bundle):
    no spike, no rollback. `pytest -m slow -k healthy_run` (about 20 min here)."""
    data = ([f"data.shards={silhouettes['full']}/a-*.tar", f"data.shards_b={silhouettes['full']}/b-*.tar"]
            if config == "cyclegan_silhouettes" else [f"data.shards={mnist_shards}/train-*.tar"])
    run = tmp_path / "run"
    gannet.trainer.loop.train(load_config(config, [*data, "train.steps=300", "train.log_every=10", "train.sample_every=300",
                                                   "train.checkpoint_every=300", "log.wandb=disabled", f"run_dir={run}",
                                                   "optim.g.decay_from=150", "optim.d.decay_from=150"]
                                          if config == "cyclegan_silhouettes" else
                                          [*data, "train.steps=300", "train.log_every=10", "train.sample_every=300",
                                           "train.checkpoint_every=300", "log.wandb=disabled", f"run_dir={run}"]))
    assert metrics(run)[-1]["train/spikes"] == 0 and metrics(run)[-1]["train/rollbacks"] == 0


def test_a_healthy_run_of_the_default_never_triggers(small_shards, tmp_path):
    """The cheap variant, in `make test`: the default config (sngan_mnist), narrow, 120 steps."""
    run = tmp_path / "run"
    gannet.trainer.loop.train(load_config("sngan_mnist", tiny_overrides(small_shards, run, **{
        **TINY, "train.steps": 120, "train.log_every": 10, "train.checkpoint_every": 60})))
    last = metrics(run)[-1]
    assert last["step"] == 120 and last["train/spikes"] == 0 and last["train/rollbacks"] == 0 and last["train/nonfinite_steps"] == 0


# -- a clean exit --------------------------------------------------------------------------------------

def test_a_zero3_job_closes_with_every_group_drained_and_deepspeeds_own_group_gone(tmp_path):
    """ZeRO-3 runs its asynchronous collectives on DeepSpeed's own copy of the world group. Closing
    the job drains every group and lets go of that one (its gloo threads are joined then, not during
    the interpreter's teardown, where a collective still finishing aborted a rank: "terminate called
    without an active exception"); before, both groups' threads outlived close()."""
    out = tmp_path / "w.st"
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), str(REPO / "tests" / "dist_harness.py"),
         str(out), "2", "train.cpu=true", "train.mixed_precision=no", "train.strategy=deepspeed", "optim.g.zero_stage=3",
         "optim.d.zero_stage=3"])
    for rank in (0, 1):
        threads = json.loads(Path(f"{out}.rank{rank}.threads.json").read_text())
        assert threads.count("pt_gloo_runloop") <= 2 and threads.count("gloo_tcp_loop") <= 1, threads  # WORLD's at most
