"""`gannet slurm` against a real two-node Slurm started on this machine (tests/slurm_cluster.py):
a 2-node job trains to the end, a preempted job saves, requeues and ends bit-identical to an
uninterrupted run with one continuous W&B history, and a sweep array finishes every job. The
dry run and the sbatch script need no cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gannet.trainer.checkpoint.statefile import load_state
from gannet.trainer.tracking.tracker import read_metrics
from gannet.trainer.tracking.wandb_files import find_run_files, read_history
from tests import slurm_cluster
from tests.conftest import gannet, tiny_overrides, without_perf

JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def cluster():
    missing = slurm_cluster.missing_binaries()
    reason = (f"Slurm is not installed (missing {', '.join(missing)}; .ci/run installs slurmctld slurmd slurm-client munge)"
              if missing else "the local Slurm daemons run as root" if os.geteuid() != 0 else "")
    if not reason:
        try:
            started = slurm_cluster.start()
        except RuntimeError as exc:
            reason = f"the local Slurm did not start: {exc}"
    if reason:
        print(f"\nSKIPPED Slurm tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(started.conf)  # gannet() and the jobs it submits talk to this cluster
    yield started
    subprocess.run(["scancel", "--user", str(os.getuid())], env=started.env, capture_output=True)
    slurm_cluster.stop()
    if previous is None:
        del os.environ["SLURM_CONF"]
    else:
        os.environ["SLURM_CONF"] = previous


def submit(*args: str) -> list[str]:
    """`gannet slurm ...`; the submitted job ids."""
    out = gannet("slurm", *args).stdout
    return re.findall(r"^  job (\S+) ", out, flags=re.M)


def wait(cluster: slurm_cluster.Cluster, run: Path, job_ids: list[str]) -> None:
    """Until no job of `job_ids` (arrays: their tasks) is queued or running; the logs if it takes too long."""
    deadline = time.time() + JOB_TIMEOUT_S
    bases = {job.split("_")[0] for job in job_ids}
    while time.time() < deadline:
        queued = subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster.env, capture_output=True, text=True).stdout.split()
        if not any(q.split("_")[0] in bases for q in queued):
            return
        time.sleep(1)
    logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(run.rglob("slurm/*.err")))
    pytest.fail(f"jobs {job_ids} still queued after {JOB_TIMEOUT_S} s\n{logs}\n{cluster.logs()}")


def job_log(run: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((run / "slurm").glob("*_log.err")))


def cpu_job(shards: Path, run: Path, *args: str, **overrides: object) -> list[str]:
    return submit("lsgan_mnist", "--nodes", "1", "--gpus-per-node", "0", "--time-s", "600", *args,
                  *tiny_overrides(shards, run, **overrides))


def test_two_node_job_trains_lsgan_to_the_end(cluster, small_shards, tmp_path):
    run = tmp_path / "run"
    jobs = submit("lsgan_mnist", "--nodes", "2", "--gpus-per-node", "0", "--time-s", "600",
                  *tiny_overrides(small_shards, run, **{"train.steps": 20, "train.checkpoint_every": 10, "train.sample_every": 20}))
    wait(cluster, run, jobs)
    final = run / "checkpoints" / "step-00000020"
    assert final.is_dir(), job_log(run)
    assert load_state(final / "shared")["world"] == 2  # one process on each node, one process group
    assert {p.name for p in final.glob("rank*.json")} == {"rank0.json", "rank1.json"}
    assert [r["step"] for r in read_metrics(run)] == [5, 10, 15, 20]
    assert {p.name for p in (run / "slurm").glob("*_log.out")} == {f"{jobs[0]}_0_log.out", f"{jobs[0]}_1_log.out"}


def test_preempted_job_requeues_and_resumes_exactly(cluster, small_shards, tmp_path):
    extra = {"train.steps": 40, "train.checkpoint_every": 20, "train.sample_every": 20}
    gannet("train", "lsgan_mnist", *tiny_overrides(small_shards, tmp_path / "straight", **extra))

    run = tmp_path / "run"
    (job,) = cpu_job(small_shards, run, **extra, **{"log.wandb": "offline"})
    deadline = time.time() + JOB_TIMEOUT_S
    while not ((run / "metrics.jsonl").exists() and read_metrics(run)):  # mid-run, before the first periodic save
        assert time.time() < deadline, job_log(run)
        time.sleep(0.1)
    for sig in ("TERM", "USR2"):  # a preemption as submitit's job._interrupt() sends it
        subprocess.run(["scancel", "--signal", sig, job], env=cluster.env, check=True)
    wait(cluster, run, [job])

    log = job_log(run)
    stopped = int(re.search(r"stopped at step (\d+) for the cluster", log).group(1))
    assert stopped < 20 and f"resumed {run / 'checkpoints' / f'step-{stopped:08d}'}" in log, log
    assert "Requeued job" in (run / "slurm" / f"{job}_0_log.out").read_text()
    for name in ("G", "D"):
        a, b = (load_file(str(r / "checkpoints" / "step-00000040" / f"{name}.safetensors")) for r in (tmp_path / "straight", run))
        assert all((a[k] == b[k]).all() for k in a), f"{name} differs from the uninterrupted run"
    assert without_perf(read_metrics(run)) == without_perf(read_metrics(tmp_path / "straight"))
    # W&B: two attempts (offline-run dirs) of one run id, together each logged step exactly once
    attempts = find_run_files(run)
    assert len(attempts) == 2 and len({f.name for f in attempts}) == 1
    history = [row for f in attempts for row in read_history(f)]
    assert [row["_step"] for row in history] == list(range(5, 41, 5))
    assert [row["train/loss_g"] for row in history] == [r["train/loss_g"] for r in read_metrics(run)]


def test_sweep_array_finishes_every_job(cluster, small_shards, tmp_path):
    run = tmp_path / "sweep"
    jobs = cpu_job(small_shards, run, "--sweep", "seed=1,2", **{"train.steps": 10, "train.checkpoint_every": 10,
                                                                "train.sample_every": 10})
    assert len(jobs) == 2 and jobs[0].endswith("_0") and jobs[1].endswith("_1")  # one array, two tasks
    wait(cluster, run, jobs)
    for seed in (1, 2):
        assert (run / f"seed-{seed}" / "checkpoints" / "step-00000010").is_dir(), job_log(run)
    losses = [read_metrics(run / f"seed-{seed}")[-1]["train/loss_g"] for seed in (1, 2)]
    assert losses[0] != losses[1]  # each job trained its own point


def test_dry_run_and_sbatch_script_need_no_cluster(small_shards, tmp_path):
    run = tmp_path / "run"
    args = ["lsgan_mnist", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj",
            "--time-s", "86400", "--mem", "64G", "--cpus-per-task", "6", *tiny_overrides(small_shards, run)]
    out = gannet("slurm", *args, "--sweep", "seed=1,2,3", "--dry-run").stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --time=1440", "#SBATCH --mem=64G", "#SBATCH --cpus-per-task=6",
                 "#SBATCH --signal=USR2@120", "#SBATCH --array=0-2"):
        assert line in out, out
    assert f"{run}/seed-3: python -m gannet train" in out and not run.exists()  # nothing submitted, nothing written

    script = tmp_path / "job.sh"
    gannet("slurm", *args, "--sbatch", str(script))
    text = script.read_text()
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    for part in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8", "#SBATCH --cpus-per-task=48",
                 "#SBATCH --requeue", "--num_processes 16 --multi_gpu", f"run_dir={run}", "resume=auto", "srun"):
        assert part in text, text
    assert "{{" not in text and "ACCELERATE_USE_CPU" not in text

    bad = gannet("slurm", "lsgan_mnist", "--nodes", "1", "--gpus-per-node", "0", "train.stepz=5", "--dry-run", check=False)
    assert bad.returncode == 2 and "unknown key 'train.stepz'" in bad.stderr
    bad = gannet("slurm", "lsgan_mnist", "--nodes", "1", "--gpus-per-node", "0", "--time-s", "1h", "--dry-run", check=False)
    assert bad.returncode == 2 and "argument --time-s: invalid int value: '1h'" in bad.stderr
    bad = gannet("slurm", "lsgan_mnist", "--nodes", "1", "--gpus-per-node", "0", "--time-s", "61", "--signal-delay-s", "90",
                 "--dry-run", check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == ("gannet: error: --signal-delay-s=90 must be shorter than --time-s=61: "
                                                         "Slurm's warning comes that long before the time limit")


@pytest.mark.slow  # ~25 s more; `make test` checks the script's text above (test time is scarce)
def test_plain_sbatch_script_trains_on_two_nodes(cluster, small_shards, tmp_path):
    run, script = tmp_path / "run", tmp_path / "job.sh"
    gannet("slurm", "lsgan_mnist", "--nodes", "2", "--gpus-per-node", "0", "--time-s", "600", "--sbatch", str(script),
           *tiny_overrides(small_shards, run, **{"train.steps": 10, "train.checkpoint_every": 10, "train.sample_every": 10}))
    out = subprocess.run(["sbatch", "--parsable", str(script)], env=cluster.env, capture_output=True, text=True, check=True)
    wait(cluster, run, [out.stdout.strip()])
    final = run / "checkpoints" / "step-00000010"
    assert final.is_dir(), "\n".join(p.read_text()[-3000:] for p in (run / "slurm").glob("*.out"))
    assert load_state(final / "shared")["world"] == 2
