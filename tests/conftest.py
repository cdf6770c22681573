"""Shared fixtures and helpers: real shards (the bundled digits), and the one way tests start
processes (`process_env`, `run`, `gannet`, `accelerate_train`)."""

from __future__ import annotations

import gzip
import io
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

from gannet.models import recipes as recipe_registry
from gannet.trainer.data.shards import (
    bundled_mnist,
    labelled_images,
    write_mnist_shards,
    write_silhouette_shards,
    write_split,
)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's launchers (accelerate, torchrun)

# What a test process inherits from the caller: where programs and the home folder are, and the
# machine's OpenBLAS workaround. Nothing else: a variable exported in one shell (OMP_NUM_THREADS,
# WANDB_MODE, ACCELERATE_*) must not change what a test computes (one such test passed in a
# shell with OMP_NUM_THREADS=1 and failed on every fresh machine).
PASSED_THROUGH = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TMPDIR", "SLURM_CONF",
                  "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def process_env(**extra: str) -> dict[str, str]:
    """The environment of every process a test starts. One math thread per process: a run is a
    trainer plus loader workers on a 2-core machine, oversubscribed OpenMP threads made small CPU
    runs many times slower, and the thread count changes float reduction order, so runs compared
    for bit-identity must use the same count. PYTHONPATH pins the code under test to this checkout."""
    env = {key: os.environ[key] for key in PASSED_THROUGH if key in os.environ}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_SILENT="true", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    return {**env, **extra}


def run(cmd: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `cmd` from the repo root in `process_env()`; fail the test with its stderr if it fails."""
    result = subprocess.run(cmd, cwd=REPO, env=env or process_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr[-5000:]}"
    return result


def gannet(*args: str, check: bool = True, timeout: float = 600, **popen) -> subprocess.CompletedProcess:
    """Run the real CLI (`python -m gannet ...`) in a fresh process from the repo root."""
    result = subprocess.run([sys.executable, "-m", "gannet", *args], cwd=REPO, env=process_env(), capture_output=True,
                            text=True, timeout=timeout, **popen)
    if check and result.returncode != 0:
        raise AssertionError(f"gannet {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def kill_when(cmd: list[str], ready: Callable[[], bool], *, env: dict | None = None, timeout: float = 300) -> None:
    """Start `cmd` from the repo root in its own session and SIGKILL the whole group (the trainer and
    its loader workers, no chance to clean up) as soon as `ready()` holds; fail if it ends first."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or process_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def accelerate_train(overrides: list[str], processes: int = 2, config: str = "lsgan_mnist") -> subprocess.CompletedProcess:
    """`accelerate launch` of `gannet train` on CPU processes (gloo): ACCELERATE_USE_CPU + --multi_gpu,
    since `accelerate launch --cpu` with more than one process does not distribute."""
    from gannet.trainer.engine.distributed import free_port

    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "gannet", "train", config, *overrides]
    return run(cmd, env=process_env(ACCELERATE_USE_CPU="1"))


def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST-style IDX file (gzipped if the name ends in .gz) holding `array` as bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def corrupt_copy(src: Path, dst: Path) -> None:
    """Copy the shards; truncate one tar mid-way and replace one PNG in another with junk bytes."""
    dst.mkdir()
    shards = sorted(src.glob("train-*.tar"))
    for shard in shards:
        (dst / shard.name).write_bytes(shard.read_bytes())
    truncated = dst / shards[0].name
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2 + 100])
    with tarfile.open(dst / shards[1].name) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(dst / shards[1].name, "w") as tar:
        for i, (member, payload) in enumerate(members):
            if i == 0:
                payload = b"\x89PNG not really"
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload))


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory) -> Path:
    """The real shard set `make train` uses: 9 train shards of 500 digits, 1 val shard."""
    out = tmp_path_factory.mktemp("mnist")
    write_mnist_shards(out)
    return out


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """6 shards x 100 real digits: small enough that a test sees whole epochs."""
    out = tmp_path_factory.mktemp("small")
    pixels, labels = bundled_mnist()
    index = np.random.default_rng(1).permutation(len(pixels))[:600]
    write_split(labelled_images(pixels, labels, index), out, "train", 100)
    return out


@pytest.fixture(scope="session")
def silhouettes(tmp_path_factory) -> dict[str, Path]:
    """The bundled horse (A) / zebra (B) silhouettes through the real CLI: 100 of each held out as
    image folders, then a small unpaired shard set written from those folders by `shards unpaired`."""
    full = tmp_path_factory.mktemp("silhouettes")
    write_silhouette_shards(full, shard_size=300, holdout=100)
    small = tmp_path_factory.mktemp("unpaired")
    out = gannet("shards", "unpaired", "--a", str(full / "testA"), "--b", str(full / "testB"), "--out", str(small),
                 "--shard-size", "25").stdout
    assert "4 a, 4 b shard(s)" in out
    return {"full": full, "small": small}


def worked_example() -> str:
    """The recipe module of docs/architecture.md's worked example, verbatim: a new GAN as a user
    writes it (LSGAN + a consistency penalty on D + a uniform average of G, through the contract's
    hooks alone, keeping the built-in switches through super())."""
    section = (REPO / "docs" / "architecture.md").read_text().split("## Adding a GAN", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def plugin_recipe(tmp_path, monkeypatch) -> Iterator[str]:
    """The worked example as a module in a folder on gannet.models.recipes' search path (the package's own
    folder is not written to); removed from the registry afterwards."""
    folder = tmp_path / "more_recipes"
    folder.mkdir()
    (folder / "averaged.py").write_text(worked_example())
    monkeypatch.setattr(recipe_registry, "__path__", [*recipe_registry.__path__, str(folder)])
    yield "lsgan_averaged"
    recipe_registry.RECIPES.pop("lsgan_averaged", None)
    sys.modules.pop("gannet.models.recipes.averaged", None)


def tiny_overrides(shards: Path, run_dir: Path, **extra: object) -> list[str]:
    """A small, fast LSGAN config on real shards (narrow nets, W&B off unless asked)."""
    values = {
        "data.shards": f"{shards}/train-*.tar", "data.batch_size": 32, "data.num_workers": 1,
        "model.g_width": 16, "model.d_width": 16, "train.steps": 30, "train.log_every": 5,
        "train.sample_every": 15, "train.checkpoint_every": 15, "log.wandb": "disabled", "run_dir": str(run_dir),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def without_perf(rows: list[dict]) -> list[dict]:
    """Metrics records minus timings: what two runs of the same computation must share exactly."""
    return [{k: v for k, v in row.items() if not k.startswith("perf/") and k not in LOADER_TIMINGS} for row in rows]


LOADER_TIMINGS = ("data/wait_ms", "data/loader_images_per_s")  # timings of the loader, logged beside its counts


