"""A real one-node Slurm cluster on 127.0.0.1 for tests and benchmarks.

``SlurmCluster(root).start()`` starts ``munged`` (its own key and socket), ``slurmctld`` and
``slurmd`` from Debian's ``slurm-wlm`` with a generated ``slurm.conf`` (free ports, one node with
this machine's CPUs and memory, ``proctrack/linuxproc``, ``task/none``, no cgroups, short scheduler
intervals), waits with a bounded poll for the node to be idle, and ``stop()`` ends them. Clients
find it through ``SLURM_CONF`` (:meth:`env`).

``accounting=False`` (default): ``accounting_storage/none``, so ``sacct`` is unavailable and the
backend's squeue path runs. ``accounting=True``: also a MariaDB server (its own datadir, TCP on
127.0.0.1) and ``slurmdbd`` (``accounting_storage/slurmdbd``), so ``sacct`` answers.

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
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
DB_DAEMONS = ("slurmdbd", "mariadbd", "mariadb-install-db", "mariadb")


class ClusterUnavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _memory_mib() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


class SlurmCluster:
    def __init__(self, root: Path, *, max_array_size: int = 1001, cluster: str = "corraltest",
                 accounting: bool = False, node: str = "node1", memory_kill: bool = False) -> None:
        self.root = Path(root)
        # slurmstepd samples each step's memory every second and kills a step past its --mem
        # (JobAcctGatherParams=OverMemoryKill): the one memory enforcement Slurm has without cgroups
        self.memory_kill = memory_kill
        self.accounting = accounting
        self.dbd_port = 0
        self.max_array_size = max_array_size
        self.cluster = cluster
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.conf = self.root / "etc" / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket.2"
        self.node = node
        self.cpus = os.cpu_count() or 1
        self.memory_mib = max(256, _memory_mib() - 512)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> SlurmCluster:
        wanted = DAEMONS + (DB_DAEMONS if self.accounting else ())
        missing = [d for d in wanted if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
        if missing:
            raise ClusterUnavailable(f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge)")
        if os.geteuid() != 0:
            raise ClusterUnavailable("slurmd must run as root here (SlurmdUser=root) and this is not root")
        for sub in ("etc", "munge", "state", "spool", "log", "run", "db"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o711)
        (self.root / "spool" / self.node).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        if self.accounting:
            try:
                self._start_accounting()
            except ClusterUnavailable:
                self.stop()
                raise
        self._write_conf()
        env = self.env()
        log = self.root / "log"
        if self.accounting:
            try:
                self._add_cluster(env)
            except ClusterUnavailable:
                self.stop()
                raise
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
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
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
            "JobAcctGatherType": "jobacct_gather/linux" if self.memory_kill else "jobacct_gather/none",
            "JobAcctGatherParams": "OverMemoryKill" if self.memory_kill else "",
            "JobAcctGatherFrequency": "task=1" if self.memory_kill else "",
            "AccountingStorageType": "accounting_storage/slurmdbd" if self.accounting else "accounting_storage/none",
            "AccountingStorageHost": "localhost" if self.accounting else "",
            "AccountingStoragePort": str(self.dbd_port) if self.accounting else "",
            # for slurmdbd connections this names the munge socket (slurm.conf(5), AccountingStoragePass)
            "AccountingStoragePass": str(self.socket) if self.accounting else "",
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

    def _start_accounting(self) -> None:
        """MariaDB in its own datadir on a free loopback port, then slurmdbd on another."""
        db = self.root / "db"
        sock = self.root / "run" / "mysqld.sock"
        res = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={db / 'data'}", "--user=root",
                              "--auth-root-authentication-method=normal", "--skip-test-db"],
                             capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise ClusterUnavailable(f"mariadb-install-db failed: {(res.stderr or res.stdout).strip()[-300:]}")
        db_port = _free_port()
        self._spawn("mariadbd", ["mariadbd", "--no-defaults", f"--datadir={db / 'data'}", "--user=root",
                                 f"--socket={sock}", "--bind-address=127.0.0.1", f"--port={db_port}",
                                 f"--pid-file={self.root / 'run' / 'mysqld.pid'}", "--skip-log-bin",
                                 "--innodb-buffer-pool-size=64M", f"--log-error={self.root / 'log' / 'mariadbd.log'}"],
                    dict(os.environ))
        password = os.urandom(12).hex()
        sql = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{password}'; "
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
        deadline = time.monotonic() + 60
        while True:
            res = subprocess.run(["mariadb", "--no-defaults", f"--socket={sock}", "-uroot", "-e", sql],
                                 capture_output=True, text=True, timeout=30)
            if res.returncode == 0:
                break
            if self.procs["mariadbd"].poll() is not None or time.monotonic() > deadline:
                raise ClusterUnavailable(f"MariaDB did not start: {self._tail('mariadbd.log')}")
            time.sleep(0.2)
        self.dbd_port = _free_port()
        conf = self.root / "etc" / "slurmdbd.conf"
        conf.write_text("".join(f"{k}={v}\n" for k, v in {
            "AuthType": "auth/munge", "AuthInfo": f"socket={self.socket}", "DbdHost": "localhost",
            "DbdAddr": "127.0.0.1", "DbdPort": str(self.dbd_port), "SlurmUser": getpass.getuser(),
            "StorageType": "accounting_storage/mysql", "StorageHost": "127.0.0.1", "StoragePort": str(db_port),
            "StorageUser": "slurm", "StoragePass": password, "StorageLoc": "slurm_acct_db",
            "PidFile": str(self.root / "run" / "slurmdbd.pid"), "LogFile": str(self.root / "log" / "slurmdbd.log"),
            "DebugLevel": "info",
        }.items()))
        os.chmod(conf, 0o600)
        self._spawn("slurmdbd", ["slurmdbd", "-D", "-s"], {**os.environ, "SLURM_CONF": str(self.conf)})
        # slurmdbd reads slurmdbd.conf from the folder of SLURM_CONF.
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex(("127.0.0.1", self.dbd_port)) == 0:
                    return
            if self.procs["slurmdbd"].poll() is not None or time.monotonic() > deadline:
                raise ClusterUnavailable(f"slurmdbd did not start: {self._tail('slurmdbd.log')}")
            time.sleep(0.2)

    def _add_cluster(self, env: dict[str, str]) -> None:
        res = subprocess.run(["sacctmgr", "-i", "add", "cluster", self.cluster], env=env, capture_output=True,
                             text=True, timeout=60)
        if res.returncode != 0 and "already exists" not in (res.stdout + res.stderr).lower():
            raise ClusterUnavailable(f"sacctmgr add cluster failed: {(res.stderr or res.stdout).strip()[-300:]}")

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


_SHARED: dict[object, SlurmCluster | ClusterUnavailable] = {}


def memory_kill_cluster() -> SlurmCluster:
    """A second cluster per test process whose slurmstepd kills a step past its --mem
    (``memory_kill``). Raises ClusterUnavailable (cached)."""
    got = _SHARED.get("memory_kill")
    if got is None:
        import atexit
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="corral-slurm-mk-"))
        try:
            got = SlurmCluster(root, node="node3", memory_kill=True).start()
            atexit.register(got.stop)
        except ClusterUnavailable as exc:
            got = exc
        _SHARED["memory_kill"] = got
    if isinstance(got, ClusterUnavailable):
        raise got
    return got


def shared_cluster(accounting: bool = False) -> SlurmCluster:
    """One cluster per test process (and kind), started on first use and stopped at exit, so the
    Slurm tests and the backend contract suite share it. Raises ClusterUnavailable (cached)."""
    got = _SHARED.get(accounting)
    if got is None:
        import atexit
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="corral-slurm-"))
        try:
            got = SlurmCluster(root, accounting=accounting, node="node2" if accounting else "node1").start()
            atexit.register(got.stop)
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # a CI timeout: stop the daemons too
                signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        except ClusterUnavailable as exc:
            got = exc
        _SHARED[accounting] = got
    if isinstance(got, ClusterUnavailable):
        raise got
    return got


if __name__ == "__main__":  # a cluster to play with: python tests/slurm_cluster.py /tmp/slurm
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `timeout` or kill: still stop the daemons
    args = [a for a in sys.argv[1:] if a != "--accounting"]
    c = SlurmCluster(Path(args[0] if args else "/tmp/corral-slurm"), accounting="--accounting" in sys.argv).start()
    print(f"export SLURM_CONF={c.conf}")
    try:
        signal.pause()
    finally:
        c.stop()
