"""`gannet slurm`: a subcommand this package adds to trainer's CLI (entry-point group `gannet.commands`).

The dependency runs one way: launch imports trainer, trainer finds this through package metadata.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable


def slurm_command(sub: argparse._SubParsersAction) -> Callable[[argparse.Namespace], int]:
    """The `gannet slurm` subcommand (registered under the `gannet.commands` entry points)."""
    p = sub.add_parser("slurm", help="submit training to Slurm (submitit)", description=(
        "Submit CONFIG to Slurm through submitit: one task per GPU, the same training entry point as `gannet train`, "
        "resume=auto into a run directory fixed now, a checkpoint on Slurm's time-limit/preemption signal and a requeue. "
        "Slurm logs and submitit files go to RUN_DIR/slurm/."))
    p.add_argument("config", help="YAML file or config name, e.g. sngan_mnist")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="as for gannet train")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0 for a CPU job")
    p.add_argument("--tasks-per-node", type=int, default=0, help="processes per node (default: one per GPU; 1 on CPU)")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--time", default="60", help="time limit: minutes or [D-]HH:MM:SS (default 60)")
    p.add_argument("--constraint", default="")
    p.add_argument("--mem", default="", help="memory per node, e.g. 64G")
    p.add_argument("--cpus-per-task", type=int, default=0)
    p.add_argument("--signal-delay-s", type=int, default=120, help="USR2 this long before the time limit (default 120)")
    p.add_argument("--sweep", action="append", default=[], metavar="key=v1,v2",
                   help="a job array over these values (repeat for a product); each point trains into RUN_DIR/<key-value>/")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    p.add_argument("--sbatch", type=Path, metavar="FILE", help="write a plain sbatch script (srun + accelerate launch) instead")
    return cmd_slurm


def cmd_slurm(args: argparse.Namespace) -> int:
    from gannet.launch.slurm import SlurmSettings, submit  # submitit is imported only for this command

    settings = SlurmSettings(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node, partition=args.partition,
        account=args.account, time=args.time, constraint=args.constraint, mem=args.mem, cpus_per_task=args.cpus_per_task,
        signal_delay_s=args.signal_delay_s,
    )
    print(submit(args.config, args.overrides, settings, sweeps=args.sweep, dry_run=args.dry_run, sbatch=args.sbatch))
    return 0


