"""Slurm: submitit jobs (`gannet slurm`) and plain sbatch scripts, from one set of settings.

A submitit job runs one task per GPU (or `tasks_per_node` CPU tasks); each task exports the torch
distributed environment and calls the same entry point as `python -m gannet train`, with
`resume=auto` into a run directory fixed at submission. So a requeued job continues its run and
its W&B run (the id is kept in the run directory).

Time limits and preemption: Slurm signals USR2 `signal_delay_s` before the end. Every task turns
it into a stop request (gannet.trainer.engine.preemption); at the next log step all ranks agree, save a
checkpoint of that step and leave the loop; then rank 0 hands over to submitit, which calls
`TrainJob.checkpoint` (resubmit the same job) and requeues it. Without the signal (a node lost, a
SIGKILL), the requeued job resumes from the latest periodic save. Files land in RUN/slurm/.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from gannet.trainer.errors import ConfigError

TEMPLATE = Path(__file__).resolve().parent / "slurm.sbatch"


@dataclass
class SlurmSettings:
    """What `gannet slurm` asks Slurm for; the submitit job and the sbatch script share it."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU job
    tasks_per_node: int = 0  # processes per node; 0 = one per GPU (1 on CPU)
    partition: str = ""
    account: str = ""
    time_s: int = 3600  # the job's time limit; Slurm counts whole minutes (rounded up)
    constraint: str = ""
    mem: str = ""  # per node, e.g. 64G
    cpus_per_task: int = 0  # 0: Slurm's default
    signal_delay_s: int = 120  # USR2 this long before the time limit: time to reach a log step and save
    max_requeues: int = 3  # time-limit requeues before the job gives up (preemptions are not counted)

    def __post_init__(self) -> None:
        for key in ("nodes", "time_s", "gpus_per_node", "tasks_per_node", "cpus_per_task", "signal_delay_s", "max_requeues"):
            least = 1 if key in ("nodes", "time_s") else 0
            if getattr(self, key) < least:
                raise ConfigError(f"--{key.replace('_', '-')}={getattr(self, key)} must be >= {least}")
        if self.signal_delay_s >= self.time_s:
            raise ConfigError(f"--signal-delay-s={self.signal_delay_s} must be shorter than --time-s={self.time_s}: Slurm's "
                              f"warning comes that long before the time limit")
        self.tasks_per_node = self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def minutes(self) -> int:
        """The time limit in whole minutes, rounded up (the unit of submitit and of sbatch's --time)."""
        return -(-self.time_s // 60)

    def submitit_parameters(self, job_name: str) -> dict[str, Any]:
        optional = {"partition": self.partition, "account": self.account, "constraint": self.constraint, "mem": self.mem,
                    "gpus_per_node": self.gpus_per_node, "cpus_per_task": self.cpus_per_task}
        return {"job_name": job_name, "nodes": self.nodes, "ntasks_per_node": self.tasks_per_node, "time": self.minutes,
                "signal_delay_s": self.signal_delay_s, **{k: v for k, v in optional.items() if v}}


def sweep_points(sweeps: list[str]) -> list[list[str]]:
    """`--sweep a=1,2 --sweep b=x,y` -> the overrides of each job of the array (the product)."""
    axes = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--sweep {sweep!r} is not of the form key=v1,v2,... (e.g. train.seed=0,1,2)")
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [list(point) for point in itertools.product(*axes)]


class TrainJob(submitit.helpers.Checkpointable):
    """What each Slurm task runs: `python -m gannet train CONFIG OVERRIDES resume=auto`, distributed."""

    def __init__(self, config: str, overrides: list[str], run_dir: Path):
        self.config = config
        self.overrides = overrides
        self.run_dir = run_dir

    def __call__(self) -> str:
        from gannet.trainer.checkpoint.store import latest_checkpoint
        from gannet.trainer.cli import prepare_process
        from gannet.trainer.config.loader import load_config
        from gannet.trainer.engine import preemption
        from gannet.trainer.loop import train

        prepare_process()
        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            # CUDA_VISIBLE_DEVICES stays as Slurm set it: Accelerate takes GPU LOCAL_RANK % visible GPUs,
            # right whether a task sees all of its node's GPUs or only its own.
            dist = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            os.environ["MASTER_ADDR"] = node_address(dist.master_addr)  # Slurm's node name may not resolve
        # A preemption's SIGTERM goes to every process of the task; ignored (inherited by the loader
        # workers), it leaves the run to the USR2 that follows. Slurm's SIGKILL still ends it later.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        requeue = preemption.watch(signal.SIGUSR2)  # submitit's handler: checkpoint() + requeue, called below
        cfg = load_config(self.config, [*self.overrides, "resume=auto"])
        run_dir = train(cfg)
        latest = latest_checkpoint(run_dir)
        unfinished = latest is None or int(latest.name.split("-")[1]) < cfg.train.steps
        if preemption.requested() and unfinished and job.global_rank == 0:
            requeue(signal.SIGUSR2, None)  # resubmits this job (checkpoint()), requeues, and exits
        return str(run_dir)


def node_address(name: str) -> str:
    """The address Slurm reaches node `name` at (its NodeAddr; the name itself if Slurm says none)."""
    out = subprocess.run(["scontrol", "show", "node", name], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"NodeAddr=(\S+)", out)
    return match.group(1) if match else name


def submit(config: str, overrides: list[str], settings: SlurmSettings, *, sweeps: list[str] = (),
           dry_run: bool = False, sbatch: Path | None = None) -> str:
    """Check every job's config, then submit one job or an array (or only describe / write it).

    Returns the report for the terminal. Sweep points train into RUN/<key-value>/; submitit's
    files and the Slurm logs go to RUN/slurm/."""
    from gannet.trainer.config.loader import load_config, resolve_config_path

    config_path = str(resolve_config_path(config).resolve())
    base = load_config(config_path, overrides)
    root = base.run_path.resolve()
    jobs = [_job(config_path, overrides, point, root, base.name) for point in (sweep_points(sweeps) if sweeps else [[]])]
    if sbatch is not None:
        if len(jobs) > 1:
            raise ConfigError("--sbatch writes one job's script; submit sweeps with gannet slurm (submitit)")
        (root / "slurm").mkdir(parents=True, exist_ok=True)  # sbatch does not create its --output folder
        sbatch.write_text(sbatch_script(jobs[0], settings, base.name, root / "slurm"))
        return f"wrote {sbatch}: submit it with `sbatch {sbatch}`"
    if not dry_run and shutil.which("srun") is None:
        raise ConfigError("Slurm's srun is not on PATH: run gannet slurm on a Slurm login node "
                          "(or see the job first with --dry-run, or write a plain script with --sbatch FILE)")
    executor = (DescribingExecutor if dry_run else submitit.SlurmExecutor)(folder=root / "slurm", max_num_timeout=settings.max_requeues)
    executor.update_parameters(**settings.submitit_parameters(base.name))
    lines = [f"  {job.run_dir}: python -m gannet train {shlex.join([job.config, *job.overrides, 'resume=auto'])}" for job in jobs]
    if dry_run:
        # submitit's own sbatch text (a private helper: the public API only renders it by submitting)
        from submitit.slurm.slurm import _make_sbatch_string

        script = _make_sbatch_string(command=executor._submitit_command_str, folder=executor.folder,
                                     **{**executor.parameters, "map_count": len(jobs) if len(jobs) > 1 else None})
        return "\n".join([f"dry run: would submit {len(jobs)} job(s), {settings.nodes} node(s) x {settings.tasks_per_node} "
                          f"task(s) each; files in {root / 'slurm'}", *lines, "--- sbatch script (submitit) ---", script])
    submitted = executor.submit_array(jobs) if len(jobs) > 1 else [executor.submit(jobs[0])]
    return "\n".join([f"submitted {len(jobs)} job(s); Slurm logs and submitit files in {root / 'slurm'}",
                      *(f"  job {sub.job_id}{line[1:]}" for sub, line in zip(submitted, lines))])


class DescribingExecutor(submitit.SlurmExecutor):
    """A submitit executor that only renders what it would submit: `--dry-run` works on a laptop or a
    CI machine without Slurm (submitit's own executor refuses to exist where `srun` is missing)."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def _job(config_path: str, overrides: list[str], point: list[str], root: Path, name: str) -> TrainJob:
    """One job of a submission: its own run directory (a sweep point's below the root), checked now."""
    from gannet.trainer.checkpoint.store import latest_checkpoint
    from gannet.trainer.config.loader import load_config

    slug = re.sub(r"[^\w.-]+", "-", ",".join(point))
    run_dir = root / slug if point else root
    job_overrides = [*overrides, *point, f"run_dir={run_dir}", *([f"name={name}-{slug}"] if point else [])]
    cfg = load_config(config_path, job_overrides)  # a bad sweep value fails here, before anything is queued
    if cfg.resume == "never" and latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds checkpoints: add resume=auto to continue it, or choose another run_dir=...")
    return TrainJob(config_path, job_overrides, run_dir)


def sbatch_script(job: TrainJob, settings: SlurmSettings, name: str, log_dir: Path) -> str:
    """The plain sbatch version of `job` (launch/slurm.sbatch filled in)."""
    directives = {"partition": settings.partition, "account": settings.account, "constraint": settings.constraint,
                  "mem": settings.mem, "gpus-per-node": settings.gpus_per_node,
                  "cpus-per-task": settings.cpus_per_task * settings.tasks_per_node}  # the node's launcher runs all its tasks
    processes = settings.nodes * settings.tasks_per_node
    values = {
        "job_name": name, "nodes": settings.nodes, "minutes": settings.minutes, "log_dir": log_dir,
        "directives": "\n".join(f"#SBATCH --{k}={v}" for k, v in directives.items() if v),
        "processes_per_node": settings.tasks_per_node, "processes": processes, "multi": "--multi_gpu" if processes > 1 else "",
        "environment": "" if settings.gpus_per_node else "export ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1  # CPU processes, gloo",
        "accelerate": shlex.quote(str(Path(sys.executable).parent / "accelerate")),
        "train_args": shlex.join([job.config, *job.overrides, "resume=auto"]),
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    return text
