"""A real one-node Slurm cluster on 127.0.0.1 for tests and benchmarks.

``SlurmCluster(root).start()`` starts ``munged`` (its own key and socket), ``slurmctld`` and
``slurmd`` from Debian's ``slurm-wlm`` with a generated ``slurm.conf`` (free ports, one node with
this machine's CPUs and memory, ``proctrack/linuxproc``, ``task/none``, no cgroups, short scheduler
intervals), waits with a bounded poll for the node to be idle, and ``stop()`` ends them. Clients
find it through ``SLURM_CONF`` (:meth:`env`). No accounting daemon: ``accounting_storage/none``, so
``sacct`` is unavailable and the backend's squeue/scontrol path is what runs here.

Raises :class:`ClusterUnavailable` saying why when a daemon is missing or does not come up.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


class ClusterUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_mib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


class SlurmCluster:
    def __init__(self, root: Path, *, max_array_size: int = 1001, cluster: str = "corraltest") -> None:
        self.root = Path(root)
        self.max_array_size = max_array_size
        self.cluster = cluster
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.conf = self.root / "etc" / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket.2"
        self.node = "node1"
        self.cpus = os.cpu_count() or 1
        self.memory_mib = max(256, _memory_mib() - 512)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> SlurmCluster:
        missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
        if missing:
            raise ClusterUnavailable(f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
        if os.geteuid() != 0:
            raise ClusterUnavailable("slurmd must run as root here (SlurmdUser=root) and this is not root")
        for sub in ("etc", "munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o711)
        (self.root / "spool" / self.node).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._write_conf()
        env = self.env()
        log = self.root / "log"
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf), "-L", str(log / "slurmctld.log")], env)
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node, "-L", str(log / "slurmd.log")],
                    env)
        try:
            self._wait_idle()
        except ClusterUnavailable:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            subprocess.run(["scancel", "--full", "-u", getpass.getuser()], env=self.env(), capture_output=True,
                           timeout=10)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- pieces -------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "wb")  # noqa: SIM115 - kept open for the daemon
        self.procs[name] = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn("munged", [
            "munged", "-F", "-f", f"--socket={self.socket}", f"--key-file={key}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}",
        ], dict(os.environ))
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if self.procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise ClusterUnavailable(f"munged did not start: {self._tail('munged.log')}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        r = self.root
        user = getpass.getuser()
        lines = {
            "ClusterName": self.cluster,
            "SlurmctldHost": "localhost(127.0.0.1)",
            "SlurmctldPort": str(_free_port()),
            "SlurmdPort": str(_free_port()),
            "SlurmUser": user,
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "CredType": "cred/munge",
            "AuthInfo": f"socket={self.socket}",
            "StateSaveLocation": str(r / "state"),
            "SlurmdSpoolDir": str(r / "spool" / "%n"),
            "SlurmctldPidFile": str(r / "run" / "slurmctld.pid"),
            "SlurmdPidFile": str(r / "run" / "slurmd-%n.pid"),
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "JobCompType": "jobcomp/filetxt",
            "JobCompLoc": str(r / "log" / "jobcomp.txt"),
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core_Memory",
            "SchedulerType": "sched/backfill",
            "SchedulerParameters": "defer_batch=0,sched_min_interval=0,sched_interval=1,bf_interval=1",
            "MaxArraySize": str(self.max_array_size),
            "MaxJobCount": "50000",
            "MinJobAge": "600",
            "MessageTimeout": "10",
            "SlurmctldTimeout": "30",
            "SlurmdTimeout": "30",
            "InactiveLimit": "0",
            "KillWait": "2",
            "ReturnToService": "2",
            "SlurmctldLogFile": str(r / "log" / "slurmctld.log"),
            "SlurmdLogFile": str(r / "log" / "slurmd.log"),
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "MpiDefault": "none",
        }
        text = "".join(f"{k}={v}\n" for k, v in lines.items() if v)
        text += (
            f"NodeName={self.node} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={self.memory_mib} TmpDisk=100000 State=UNKNOWN\n"
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO\n"
        )
        self.conf.write_text(text)

    def _wait_idle(self, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.1
        last = ""
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise ClusterUnavailable(f"{name} exited ({p.returncode}): {self._tail(f'{name}.log')}")
            res = subprocess.run(["sinfo", "-h", "-n", self.node, "-o", "%t"], env=self.env(),
                                 capture_output=True, text=True, timeout=15)
            last = (res.stdout or res.stderr).strip()
            if res.returncode == 0 and last.rstrip("*") == "idle":
                return
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        raise ClusterUnavailable(f"node {self.node} not idle after {timeout:g}s (sinfo: {last or 'no answer'}); "
                                 f"slurmd: {self._tail('slurmd.log')}")

    def _tail(self, name: str) -> str:
        for candidate in (self.root / "log" / name, self.root / "log" / name.replace(".log", ".stdout")):
            with contextlib.suppress(OSError):
                lines = [ln for ln in candidate.read_text(errors="replace").splitlines() if ln.strip()]
                if lines:
                    return lines[-1][-300:]
        return "(no log)"


if __name__ == "__main__":  # a cluster to play with: python tests/slurm_cluster.py /tmp/slurm
    import sys

    c = SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/corral-slurm")).start()
    print(f"export SLURM_CONF={c.conf}")
    try:
        signal.pause()
    finally:
        c.stop()
