"""A real two-node Slurm cluster on this machine, for the launcher tests (Debian's packages).

Started from scratch in one fixed folder, /tmp/gannet-slurm-test: its own munge daemon (own key
and socket), `slurmctld`, and two `slurmd` daemons emulating nodes n1 and n2 on loopback, on free
ports (the settings that matter: proctrack/linuxproc, task/none, root as SlurmUser and SlurmdUser,
one NodeAddr=127.0.0.1 with its own port per node, a short cred_expire). The folder is fixed so that daemons left by
a crashed earlier session are found by their pid files and stopped before a new cluster starts.
Where Slurm is not installed or cannot start, the tests skip and say why; `.ci/run` installs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/tmp/gannet-slurm-test")
DAEMONS = ("munged", "slurmctld", "slurmd")
NODES = ("n1", "n2")
CPUS_PER_NODE = 2


@dataclass
class Cluster:
    root: Path
    conf: Path

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (sbatch, squeue, submitit) that talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def logs(self) -> str:
        """The daemons' logs, for a failing test's message."""
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))


def missing_binaries() -> list[str]:
    return [b for b in (*DAEMONS, "sbatch", "squeue", "scontrol", "sinfo") if shutil.which(b) is None]


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def stop(root: Path = ROOT) -> None:
    """Stop every daemon whose pid file lies in `root` (this cluster's, or a crashed run's), and
    only if that pid still runs a Slurm or munge daemon (a stale file's pid may be reused)."""
    pids = []
    for pid_file in root.glob("*.pid"):
        try:
            pid = int(pid_file.read_text().split()[0])
            name = Path(f"/proc/{pid}/comm").read_text().strip()
        except (ValueError, IndexError, OSError):
            continue
        if name in DAEMONS:
            pids.append(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid in pids if _signal(pid, sig)]
        deadline = time.time() + 10
        while alive and time.time() < deadline:
            alive = [pid for pid in alive if _running(pid)]
            time.sleep(0.1)
        if not alive:
            return


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def start(root: Path = ROOT) -> Cluster:
    """Start munge, slurmctld and slurmd n1/n2 in `root`; raise RuntimeError saying why if it fails."""
    stop(root)
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("state", "spool/n1", "spool/n2"):
        (root / sub).mkdir(parents=True)
    root.chmod(0o700)  # munged refuses key and socket folders others may write to
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    munge_socket = root / "munge.socket"
    _run(["munged", "--force", f"--socket={munge_socket}", f"--key-file={key}", f"--pid-file={root / 'munged.pid'}",
          f"--log-file={root / 'munged.log'}", f"--seed-file={root / 'munged.seed'}"])
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, munge_socket, ctld_port, node_ports))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _run(["slurmctld", "-f", str(conf), "-i"], env)
    for node in NODES:
        _run(["slurmd", "-f", str(conf), "-N", node], env)
    cluster = Cluster(root, conf)
    deadline = time.time() + 60
    while time.time() < deadline:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True).stdout
        if states.count("idle") == len(NODES):
            return cluster
        time.sleep(0.5)
    raise RuntimeError(f"Slurm nodes did not become idle in 60 s (sinfo: {states.strip()!r})\n{cluster.logs()}")


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:1])} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")


def _slurm_conf(root: Path, munge_socket: Path, ctld_port: int, node_ports: list[int]) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={CPUS_PER_NODE} "
        f"RealMemory=4000 State=UNKNOWN"
        for name, port in zip(NODES, node_ports)
    )
    return f"""\
ClusterName=gannettest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldPort={ctld_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
MinJobAge=300
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""
