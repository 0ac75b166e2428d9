"""A throwaway single-node SLURM on localhost (Debian's slurmctld, slurmd and munge), for tests and CI.

``SlurmCluster(root).start()`` writes everything under ``root``: its own munge key and socket, a ``slurm.conf``
on free ports (one node, ``localhost``, one ``debug`` partition), state, spool, logs and pid files; then starts
``munged``, ``slurmctld`` and ``slurmd`` directly (no systemd) and waits until the node is idle. ``stop()``
cancels this cluster's jobs and ends only the daemons it started, by the pids in its own pid files; it never
looks for daemons by name. ``env()`` is the environment for clients and launchers: ``SLURM_CONF``, and ``PATH``
with a fake ``sacct`` first (there is no accounting daemon; submitit needs ``sacct`` to see a job die without a
result), which answers from ``scontrol show job``.

Needs root (``SlurmUser=root``) and the Debian packages ``slurmctld slurmd slurm-client munge``. ``unavailable()``
says why it cannot run here, or returns ``None``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sbatch", "scontrol", "squeue", "sinfo", "scancel", "srun")

FAKE_SACCT = '''#!{python}
"""Fake sacct (no accounting daemon here): answers submitit's
`sacct -o JobID,State,NodeList --parsable2 -j ID ...` from `scontrol show job -o`."""
import subprocess, sys

args = sys.argv[1:]
fields = ["JobID", "State", "NodeList"]
ids = []
for i, arg in enumerate(args):
    if arg in ("-o", "--format") and i + 1 < len(args):
        fields = args[i + 1].split(",")
    elif arg.startswith("--format="):
        fields = arg.split("=", 1)[1].split(",")
    elif arg in ("-j", "--jobs") and i + 1 < len(args):
        ids += args[i + 1].split(",")
print("|".join(fields))
for job_id in ids:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    for line in out.splitlines():
        info = dict(token.split("=", 1) for token in line.split() if "=" in token)
        array, task = info.get("ArrayJobId"), info.get("ArrayTaskId")
        if array and task:
            name = f"{{array}}_{{task}}" if task.isdigit() else f"{{array}}_[{{task}}]"
        else:
            name = info.get("JobId", job_id)
        values = {{"JobID": name, "State": info.get("JobState", "UNKNOWN"), "NodeList": info.get("NodeList", ""),
                  "ExitCode": info.get("ExitCode", ""), "JobName": info.get("JobName", "")}}
        print("|".join(values.get(f, "") for f in fields))
'''


def unavailable() -> Optional[str]:
    """Why a test SLURM cannot run here, or ``None``."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name, path=_sbin_path()) is None]
    if missing:
        return (f"SLURM is not installed (missing {', '.join(missing)}); "
                "apt-get install slurmctld slurmd slurm-client munge")
    if os.geteuid() != 0:
        return "the test SLURM runs its daemons as root (SlurmUser=root); not root here"
    return None


def _sbin_path() -> str:
    return os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    """One controller and one node on localhost, everything under ``root`` (see the module docstring)."""

    def __init__(self, root: Path, cpus: Optional[int] = None, memory_mb: int = 8000) -> None:
        self.root = Path(root).absolute()
        self.cpus = max(2, cpus or os.cpu_count() or 2)
        self.memory_mb = memory_mb
        self.conf = self.root / "slurm.conf"
        self.bin = self.root / "bin"
        self.logs = self.root / "log"
        self.pid_files = {"munged": self.root / "munge" / "munged.pid",
                          "slurmctld": self.root / "slurmctld.pid", "slurmd": self.root / "slurmd.pid"}
        self.started: dict[str, int] = {}
        self.version = ""

    # ------------------------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        for folder in ("munge", "state", "spool", "log", "bin"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self._write_munge_key()
        self._write_conf()
        self._write_fake_sacct()
        sbin = _sbin_path()
        try:
            self._daemon("munged", [shutil.which("munged", path=sbin), "--force",
                                    f"--socket={self.munge_socket}", f"--key-file={self.root / 'munge' / 'munge.key'}",
                                    f"--log-file={self.logs / 'munged.log'}", f"--pid-file={self.pid_files['munged']}",
                                    f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
            self._daemon("slurmctld", [shutil.which("slurmctld", path=sbin), "-f", str(self.conf)])
            self._daemon("slurmd", [shutil.which("slurmd", path=sbin), "-f", str(self.conf), "-N", "localhost"])
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        self.version = subprocess.run(["sinfo", "--version"], env=self.env(), capture_output=True,
                                      text=True).stdout.strip()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Cancel this cluster's jobs, then end the daemons this object started (pids from its pid files)."""
        if "slurmctld" in self.started:
            subprocess.run(["scancel", "--full", "--user", str(os.geteuid())], env=self.env(), capture_output=True,
                           timeout=30)
            deadline = time.time() + timeout
            while time.time() < deadline and self.squeue():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.started.pop(name, None)
            if pid is not None:
                _terminate(pid, timeout)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------------ files
    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.sock"

    def _write_munge_key(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        os.chmod(self.root / "munge", 0o700)

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=testcluster",
            "SlurmctldHost=localhost",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "ReturnToService=2",
            "MpiDefault=none",
            "SlurmdParameters=config_overrides",
            "KillWait=2",          # a requeue or cancel kills a job's processes after 2 s, not 30
            "MinJobAge=3600",      # finished jobs stay visible to scontrol (the fake sacct) for an hour
            "InactiveLimit=0",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}",
            f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={self.logs / 'slurmctld.log'}",
            f"SlurmdLogFile={self.logs / 'slurmd.log'}",
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN",
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _write_fake_sacct(self) -> None:
        path = self.bin / "sacct"
        path.write_text(FAKE_SACCT.format(python=sys.executable))
        path.chmod(0o755)

    def env(self, base: Optional[dict[str, str]] = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([str(self.bin), env.get("PATH", ""), "/usr/sbin"])
        return env

    # ------------------------------------------------------------------------------------------- daemons
    def _daemon(self, name: str, command: list[str]) -> None:
        pid_file = self.pid_files[name]
        pid_file.unlink(missing_ok=True)
        result = subprocess.run(command, env=self.env(), capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{name} failed to start ({result.returncode}): {result.stderr.strip()} "
                               f"{self.log_tail(name)}")
        deadline = time.time() + 20
        while time.time() < deadline:
            text = pid_file.read_text().strip() if pid_file.exists() else ""
            if text.isdigit() and _alive(int(text)):
                self.started[name] = int(text)
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} wrote no live pid to {pid_file}; {self.log_tail(name)}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env(), capture_output=True, text=True)
            state = out.stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test node never became idle (state {state!r}); {self.log_tail('slurmctld')} "
                           f"{self.log_tail('slurmd')}")

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        if not path.exists():
            return f"({path} missing)"
        return f"{path}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    # ------------------------------------------------------------------------------------------- clients
    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(command), env=self.env(), capture_output=True, text=True, check=check, timeout=60)

    def squeue(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i %T", check=False).stdout
        return [line for line in out.splitlines() if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` fields of one job (an array task as ``<array>_<index>``)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        line = out.splitlines()[0] if out.strip() else ""
        return dict(token.split("=", 1) for token in line.split() if "=" in token)

    def wait_state(self, job_id: str, states: tuple[str, ...], timeout: float = 120.0) -> dict[str, str]:
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f} s (now {info.get('JobState')})")

    def requeue(self, job_id: str, timeout: float = 60.0) -> None:
        """``scontrol requeue``, then start it at once (a requeued job otherwise waits about two minutes)."""
        self.run("scontrol", "requeue", str(job_id))
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") == "PENDING":
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
                return
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} did not go back to PENDING after scontrol requeue")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate(pid: int, timeout: float) -> None:
    if not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":  # manual use: python tests/slurm_cluster.py /tmp/cluster  (Ctrl-C stops it)
    cluster = SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/test-slurm")).start()
    print(f"{cluster.version} up: export SLURM_CONF={cluster.conf} PATH={cluster.bin}:$PATH")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
