"""Faults injected into real runs: damaged checkpoints, crafted pickles, a full disk.

Every run here is the real CLI in its own process (`tests.conftest.gannet`, one OpenMP thread).
What each test proves is listed in README.md, "Reliability".
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gannet.trainer.checkpoint.safe_load import check_torch_file, weights_only_loads
from gannet.trainer.checkpoint.statefile import load_state
from gannet.trainer.checkpoint.store import (
    CheckpointError,
    verify_checkpoint,
    verify_run,
    write_manifest,
)
from gannet.trainer.config.schema import DataConfig
from gannet.trainer.data.stream import DataStream, decode_image_sample, expand_urls, shard_samples
from gannet.trainer.engine.distributed import free_port
from gannet.trainer.errors import DataError
from gannet.trainer.tracking.tracker import read_metrics as metrics
from tests.conftest import (
    REPO,
    gannet,
    kill_when,
    process_env,
    tiny_overrides,
    without_perf,
)

TINY = {"data.batch_size": 16, "model.g_width": 8, "model.d_width": 8, "train.num_samples": 4}


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


# -- a damaged latest checkpoint: reported, skipped for the previous one, resumed exactly ----------

def test_damaged_latest_checkpoint_is_skipped_on_resume_and_reported_by_verify(small_shards, tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(small_shards, run, **{**TINY, "train.steps": 8, "train.checkpoint_every": 4,
                                                     "train.log_every": 4, "train.sample_every": 8})
    gannet("train", "lsgan_mnist", *overrides)
    intact = (ckpt(run, 8) / "G.safetensors").read_bytes()
    assert [v.line() for v in verify_run(run)] == ["step-00000004: ok", "step-00000008: ok"]

    d_file = ckpt(run, 8) / "D.safetensors"
    size = d_file.stat().st_size
    d_file.write_bytes(d_file.read_bytes()[: size // 2])  # a copy cut short
    damaged = gannet("verify", str(run), check=False)
    assert damaged.returncode == 1
    assert damaged.stdout.splitlines() == [
        "step-00000004: ok", f"step-00000008: DAMAGED: D.safetensors has {size // 2} bytes, the manifest says {size}"]

    resumed = gannet("train", "lsgan_mnist", *overrides, "resume=auto")
    assert f"checkpoint {ckpt(run, 8)} is damaged (D.safetensors has {size // 2} bytes, the manifest says {size}): skipped" \
        in resumed.stderr
    assert f"resumed {ckpt(run, 4)} at step 4" in resumed.stderr
    assert (ckpt(run, 8) / "G.safetensors").read_bytes() == intact  # steps 5-8 again, bit for bit
    assert [r["step"] for r in metrics(run)] == [4, 8]
    assert [v.status for v in verify_run(run)] == ["ok", "ok"]


def test_verify_refuses_a_path_that_is_not_a_run(tmp_path):
    result = gannet("verify", str(tmp_path / "nowhere"), check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [f"gannet: error: {tmp_path / 'nowhere'} is not a gannet run directory "
                                                  f"(no config.yaml, no checkpoints/)"]


# -- untrusted DeepSpeed state: a pickle that would run code is refused, not run ------------------

class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_torch_file(path: Path, marker: Path) -> None:
    torch.save({"module": {"w": torch.zeros(3)}, "payload": RunsCode(marker)}, path)


def test_torch_file_whose_pickle_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    crafted_torch_file(tmp_path / "state.pt", marker)
    with pytest.raises(CheckpointError, match=r"refusing to load .*state.pt: its pickle asks for posix.system, "
                                              r"which could run code"):
        check_torch_file(tmp_path / "state.pt")
    assert not marker.exists()
    with open(tmp_path / "proof.pkl", "wb") as f:  # the same bytes unpickled plainly do run it: the test can fail
        pickle.dump(RunsCode(marker), f)
    with open(tmp_path / "proof.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_deepspeeds_own_load_is_forced_to_weights_only(tmp_path, monkeypatch):
    """Second layer: a file that changes after the check is still unpickled by DeepSpeed's
    TorchCheckpointEngine.load (weights_only=False in its source) under torch's restricted unpickler."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    marker = tmp_path / "code-ran"
    folder = tmp_path / "deepspeed_G"
    folder.mkdir()
    with weights_only_loads(folder):  # nothing to check yet: the file appears after the check
        crafted_torch_file(folder / "late.pt", marker)
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            TorchCheckpointEngine().load(str(folder / "late.pt"), map_location="cpu")
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_crafted_deepspeed_checkpoint_is_refused_on_resume(small_shards, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "code-ran"
    overrides = tiny_overrides(small_shards, run, **{**TINY, "train.strategy": "deepspeed", "train.steps": 2,
                                                     "train.checkpoint_every": 2, "train.log_every": 2, "train.sample_every": 2})
    gannet("train", "lsgan_mnist", *overrides)
    target = ckpt(run, 2) / "deepspeed_D" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert target.is_file()
    crafted_torch_file(target, marker)
    write_manifest(ckpt(run, 2), 2)  # an attacker ships a consistent manifest: integrity is not trust
    assert verify_checkpoint(ckpt(run, 2)).status == "ok"

    result = gannet("train", "lsgan_mnist", *overrides, "train.steps=4", "resume=auto", check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    assert last_line(result) == (f"gannet: error: refusing to load {target}: its pickle asks for posix.system, which could "
                                 f"run code; a DeepSpeed checkpoint holds only tensors and DeepSpeed's own state types")
    assert "Traceback" not in result.stderr
    assert not marker.exists()


# -- a full disk during a checkpoint: the previous one intact, one clear line ----------------------

@pytest.fixture
def checkpoint_disk(tmp_path):
    """RUN/checkpoints on a real tmpfs of its own (root with CAP_SYS_ADMIN, as in CI), which the
    test can shrink; skipped, with the reason, where mounting is not allowed."""
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up here: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(small_shards, tmp_path, checkpoint_disk):
    run = tmp_path / "run"
    overrides = tiny_overrides(small_shards, run, **{**TINY, "train.steps": 4, "train.checkpoint_every": 4,
                                                     "train.log_every": 4, "train.sample_every": 4})
    gannet("train", "lsgan_mnist", *overrides)
    stats = os.statvfs(checkpoint_disk)
    used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    subprocess.run(["mount", "-o", f"remount,size={used * 3 // 2}", str(checkpoint_disk)], check=True)  # room for half a checkpoint

    result = gannet("train", "lsgan_mnist", *overrides, "train.steps=8", "resume=auto", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert last_line(result) == (f"gannet: error: could not write checkpoint {ckpt(run, 8)}: No space left on device; "
                                 f"the latest complete checkpoint ({ckpt(run, 4)}) is intact")
    assert [p.name for p in checkpoint_disk.iterdir()] == ["step-00000004"]  # no half-written debris
    assert [v.line() for v in verify_run(run)] == ["step-00000004: ok"]


def test_a_checkpoint_that_fails_on_one_rank_stops_both_at_once_with_the_previous_one_intact(small_shards, tmp_path):
    """Two processes started as Slurm's srun would; rank 1's disk is full while it writes step 8's
    checkpoint (test hook GANNET_TEST_FULL_DISK=1:8), rank 0's writes succeed. The ranks agree on
    the failure instead of rank 0 waiting at the barrier for train.dist_timeout_s (300 s here):
    both exit within seconds with the same line, and step 4's checkpoint verifies."""
    run, port = tmp_path / "run", str(free_port())
    overrides = tiny_overrides(small_shards, run, **{**TINY, "train.steps": 8, "train.checkpoint_every": 4, "train.log_every": 4,
                                                     "train.sample_every": 8, "train.cpu": "true", "train.dist_timeout_s": 300})
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "gannet", "train", "lsgan_mnist", *overrides], cwd=REPO,
                              env=process_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                              MASTER_PORT=port, GANNET_TEST_FULL_DISK="1:8"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    lines = []
    for proc in procs:
        _, stderr = proc.communicate(timeout=280)
        assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
        lines.append(stderr.strip().splitlines()[-1])
    assert time.perf_counter() - started < 120  # the whole run, start-up included
    assert lines == [(f"gannet: error: could not write checkpoint {ckpt(run, 8)}: No space left on device (on rank 1); "
                      f"the latest complete checkpoint ({ckpt(run, 4)}) is intact")] * 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]  # no half-written debris
    assert [v.line() for v in verify_run(run)] == ["step-00000004: ok"]


# -- random byte corruption and truncation of shards: counted, or the budget's message -------------

def corrupt_shards(src: Path, dst: Path, seed: int) -> set[str]:
    """Copy the shards; flip 20 random bytes in each of two random shards and cut a third (maybe
    the same) at a random point. Returns the names of the damaged shards."""
    rng = np.random.default_rng(seed)
    dst.mkdir()
    shards = [Path(shutil.copy(shard, dst / shard.name)) for shard in sorted(src.glob("train-*.tar"))]
    damaged = set()
    for i in rng.choice(len(shards), 2, replace=False):
        data = bytearray(shards[i].read_bytes())
        for pos in rng.integers(0, len(data), 20):
            data[pos] ^= int(rng.integers(1, 256))
        shards[i].write_bytes(bytes(data))
        damaged.add(shards[i].name)
    cut = shards[int(rng.integers(len(shards)))]
    data = cut.read_bytes()
    cut.write_bytes(data[: int(rng.integers(len(data) // 4, len(data))) | 1])  # odd: never on a tar block boundary
    return damaged | {cut.name}


SEEDS = range(10)


@pytest.mark.parametrize("seed", SEEDS)
def test_corrupt_shards_every_damage_is_counted_and_budgeted(small_shards, tmp_path, seed):
    damaged = corrupt_shards(small_shards, tmp_path / "bad", seed)
    urls = expand_urls(f"{tmp_path / 'bad'}/train-*.tar")
    for url in urls:  # each damaged shard reports at least one error; intact ones none
        errors = []
        for sample in shard_samples([url], handler=lambda exn: errors.append(exn) or True):
            try:
                decode_image_sample(sample, 28, 1)
            except Exception as exn:  # noqa: BLE001 - what ShardStream counts
                errors.append(exn)
        assert bool(errors) == (Path(url).name in damaged), (url, errors)
    cfg = DataConfig(shards=f"{tmp_path / 'bad'}/train-*.tar", batch_size=16, num_workers=0, shuffle_buffer=50, max_errors=1000)
    stream = DataStream(urls, cfg, rank=0, world=1, seed=seed)
    for _ in range(40):  # about two passes over what is readable
        assert next(stream)["image"].shape == (16, 1, 28, 28)
    assert stream.position.errors >= len(damaged)
    strict = DataConfig(**{**cfg.__dict__, "max_errors": len(damaged) - 1})
    stream = DataStream(urls, strict, rank=0, world=1, seed=seed)
    with pytest.raises(DataError, match=rf"corrupt samples/shards skipped, over the budget data.max_errors={len(damaged) - 1}; "):
        for _ in range(40):
            next(stream)


@pytest.mark.parametrize("seed", [pytest.param(s, marks=pytest.mark.slow) if s > 0 else s for s in SEEDS])
def test_training_on_corrupt_shards_completes_counted_or_stops_with_the_budget_message(small_shards, tmp_path, seed):
    """The real CLI on each corruption: even seeds with the default budget (completes, skips
    counted), odd seeds with a budget of 1 (exit 1, the budget's line); never a traceback.
    Seed 0 runs in `make test` (the budget's line through the CLI: tests/test_train.py); all ten
    with `pytest -m slow -k corrupt_shards`."""
    corrupt_shards(small_shards, tmp_path / "bad", seed)
    run = tmp_path / "run"
    budget = {"data.max_errors": 1} if seed % 2 else {}
    result = gannet("train", "lsgan_mnist", *tiny_overrides(tmp_path / "bad", run, **{
        **TINY, **budget, "seed": seed, "train.steps": 6, "train.log_every": 3, "train.sample_every": 6,
        "train.checkpoint_every": 6}), check=False)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if seed % 2:
        assert result.returncode == 1
        assert last_line(result).startswith("gannet: error: ") and "over the budget data.max_errors=1;" in last_line(result)
    else:
        assert result.returncode == 0, result.stderr[-3000:]
        assert metrics(run)[-1]["data/skipped"] > 0 and verify_run(run)[-1].status == "ok"


# -- SIGKILL at many points of a run, mid-checkpoint included: the resumed run is bit-identical ----

KILL_RUN = {**TINY, "train.steps": 12, "train.checkpoint_every": 2, "train.log_every": 1, "train.sample_every": 6,
            "data.num_workers": 2}
# (event, step): "writing" = the checkpoint's temp folder exists (the writer is paused inside it by
# GANNET_TEST_SLOW_CHECKPOINT), "written" = the checkpoint was renamed into place, "logged" = the
# metrics row is written, "sampled" = the sample grid is written. In order: each resumed process
# runs on to the next point.
KILL_POINTS = [("writing", 2), ("written", 2), ("logged", 3), ("writing", 4), ("written", 4), ("sampled", 6),
               ("writing", 8), ("logged", 9), ("writing", 10), ("written", 12)]


def reached(run: Path, event: str, step: int) -> bool:
    if event == "writing":
        return (run / "checkpoints" / f".tmp-step-{step:08d}").exists()
    if event == "written":
        return ckpt(run, step).exists()
    if event == "sampled":
        return (run / "samples" / f"step-{step:08d}.png").exists()
    rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return any(f'"step": {step},' in row for row in rows)


ENV = process_env()


def launch(processes: int) -> tuple[list[str], dict[str, str]]:
    """The command prefix and environment for `processes` CPU processes (accelerate launch, gloo)."""
    if processes == 1:
        return [sys.executable, "-m", "gannet"], ENV
    return ([str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
             str(free_port()), "-m", "gannet"], {**ENV, "ACCELERATE_USE_CPU": "1"})


def train_until_killed(overrides: list[str], run: Path, event: str, step: int, processes: int = 1) -> None:
    """Start `gannet train ... resume=auto`, SIGKILL its whole process group at the point."""
    prefix, env = launch(processes)
    kill_when([*prefix, "train", "lsgan_mnist", *overrides, "resume=auto"], lambda: reached(run, event, step),
              env={**env, "GANNET_TEST_SLOW_CHECKPOINT": "0.5"})


@pytest.fixture(scope="module")
def uninterrupted(small_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    gannet("train", "lsgan_mnist", *tiny_overrides(small_shards, run, **KILL_RUN))
    return run


def assert_same_run(a: Path, b: Path, step: int) -> None:
    for name in ("G", "D"):
        wa, wb = (load_file(str(ckpt(run, step) / f"{name}.safetensors")) for run in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"{name} weights differ"
    sa, sb = (load_state(ckpt(run, step) / "shared")["engine"]["optimizers"] for run in (a, b))
    for name in ("G", "D"):
        assert all(torch.equal(sa[name]["state"][i]["exp_avg_sq"], sb[name]["state"][i]["exp_avg_sq"]) for i in sa[name]["state"])
    assert without_perf(metrics(a)) == without_perf(metrics(b))  # one history, nothing repeated or missing


@pytest.mark.parametrize("points", [
    pytest.param([("writing", 4)], id="mid-checkpoint"),
    pytest.param(KILL_POINTS, id="ten-points", marks=pytest.mark.slow),
])
def test_sigkill_at_each_point_then_resume_is_bit_identical(small_shards, tmp_path, uninterrupted, points):
    run = tmp_path / "run"
    overrides = tiny_overrides(small_shards, run, **KILL_RUN)
    for event, step in points:
        train_until_killed(overrides, run, event, step)
    assert (run / "checkpoints" / ".tmp-step-00000004").exists() or points != [("writing", 4)]  # killed inside the writer
    resumed = gannet("train", "lsgan_mnist", *overrides, "resume=auto")
    assert "resumed" in resumed.stderr or not list((run / "checkpoints").glob("step-*"))
    assert [v.status for v in verify_run(run)] == ["ok"] * len(verify_run(run))
    assert_same_run(uninterrupted, run, 12)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_sigkill_of_a_two_process_run_then_resume_is_bit_identical(small_shards, tmp_path, strategy):
    """Two processes (DDP, or ZeRO-2 DeepSpeed engines), killed inside the checkpoint writer and
    again just after a save, resumed: the same weights as an uninterrupted 2-process run."""
    extra = {**KILL_RUN, "data.num_workers": 1, "train.strategy": strategy, "train.steps": 8, "train.sample_every": 8}
    if strategy == "deepspeed":
        extra.update({"optim.g.zero_stage": 2, "optim.d.zero_stage": 2})
    env = launch(2)[1]

    def finish(run: Path, *more: str) -> None:
        result = subprocess.run([*launch(2)[0], "train", "lsgan_mnist", *tiny_overrides(small_shards, run, **extra), *more],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]

    finish(tmp_path / "straight")
    run = tmp_path / "killed"
    for event, step in [("writing", 4), ("written", 6)]:
        train_until_killed(tiny_overrides(small_shards, run, **extra), run, event, step, processes=2)
    finish(run, "resume=auto")
    for name in ("G", "D"):
        a, b = (load_file(str(ckpt(r, 8) / f"{name}.safetensors")) for r in (tmp_path / "straight", run))
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights differ after a {strategy} SIGKILL + resume"
    assert without_perf(metrics(run)) == without_perf(metrics(tmp_path / "straight"))
    assert all(v.status == "ok" for v in verify_run(run))


# -- W&B unreachable: the run trains to the end, logs offline, and says so -------------------------

@pytest.mark.slow
def test_training_with_wandb_unreachable_completes_and_logs_offline(small_shards, tmp_path):
    """Online W&B with nothing listening at its address (about 75 s here: W&B's 30 s init timeout
    runs beside training, then the offline fallback; the loop itself never waits for it)."""
    run = tmp_path / "run"
    env = {**ENV, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "gannet", "train", "lsgan_mnist", *tiny_overrides(small_shards, run, **{
        **TINY, "train.steps": 6, "train.log_every": 3, "train.sample_every": 6, "train.checkpoint_every": 6,
        "log.wandb": "online"})], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert time.perf_counter() - started < 300
    assert "logging offline instead, upload later with wandb sync" in result.stderr
    assert [r["step"] for r in metrics(run)] == [3, 6] and verify_run(run)[-1].status == "ok"
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
