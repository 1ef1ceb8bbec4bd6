"""The only place corral runs Slurm's commands (sbatch, squeue, sacct, scancel, scontrol, sinfo).

Every call is counted by command name (:attr:`SlurmClient.calls`), which the benchmark and the tests
read. Commands find the cluster the usual way (``SLURM_CONF``, ``/etc/slurm/slurm.conf``, configless).
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

from corral.errors import BackendError

TIMEOUT_S = 120
# `squeue -j` / `sacct -j` take a comma list; keep each argv far below ARG_MAX.
IDS_PER_CALL = 2000


@dataclass(frozen=True)
class JobRow:
    """One array task (or plain job) as squeue or sacct reports it."""

    array_job: str  # the array's job id (%F / JobIDRaw of the array)
    index: int | None  # array task id, None for a pending range already expanded or a plain job
    name: str
    state: str  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, NODE_FAIL ...
    reason: str = ""
    exit_code: str = ""


@dataclass
class SlurmClient:
    env: dict[str, str] | None = None
    calls: Counter[str] = field(default_factory=Counter)

    def run(self, argv: Sequence[str], *, check: bool = True, input_text: str | None = None) -> str:
        exe = argv[0]
        self.calls[exe] += 1
        try:
            res = subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT_S, env=self.env,
                                 input=input_text)
        except FileNotFoundError:
            raise BackendError(
                f"{exe} is not installed on this machine",
                "run corral where the Slurm client commands are (a login node), or install slurm-client",
            ) from None
        except subprocess.TimeoutExpired:
            raise BackendError(f"{exe} did not answer in {TIMEOUT_S}s", "check that slurmctld is up (`sinfo`)") \
                from None
        if check and res.returncode != 0:
            msg = (res.stderr or res.stdout).strip().splitlines()
            raise BackendError(
                f"{' '.join(argv[:2])} failed: {msg[-1] if msg else f'exit code {res.returncode}'}",
                "check the cluster with `corral doctor --backend slurm`",
            )
        return res.stdout

    @staticmethod
    def available(exe: str = "sbatch") -> bool:
        return shutil.which(exe) is not None

    # -- cluster facts ------------------------------------------------------------------------
    @cached_property
    def config(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in self.run(["scontrol", "show", "config"]).splitlines():
            key, sep, value = line.partition("=")
            if sep:
                out[key.strip()] = value.strip()
        return out

    @property
    def max_array_size(self) -> int:
        try:
            return max(1, int(self.config.get("MaxArraySize", "1001")))
        except ValueError:
            return 1001

    @property
    def accounting(self) -> bool:
        """Does the cluster keep job accounting (sacct answers)?"""
        return self.config.get("AccountingStorageType", "accounting_storage/none") != "accounting_storage/none"

    def partitions(self) -> list[dict[str, str]]:
        return [_fields(line) for line in self.run(["scontrol", "show", "partition", "--oneliner"]).splitlines()
                if line.strip()]

    def nodes(self) -> list[dict[str, str]]:
        return [_fields(line) for line in self.run(["scontrol", "show", "node", "--oneliner"]).splitlines()
                if line.strip()]

    # -- jobs ---------------------------------------------------------------------------------
    def sbatch(self, script_path: str, dependency: str = "") -> str:
        argv = ["sbatch", "--parsable"]
        if dependency:
            argv.append(f"--dependency={dependency}")
        argv.append(script_path)
        out = self.run(argv).strip().splitlines()
        job = out[-1].split(";")[0].strip() if out else ""
        if not job.isdigit():
            raise BackendError(f"sbatch answered {out!r}, not a job id", "check the batch script it was given")
        return job

    def squeue(self, *, jobs: Sequence[str] = (), names: Sequence[str] = ()) -> list[JobRow]:
        """One squeue call: every task (pending ranges expanded with -r) of these jobs or job names,
        including those that ended a short while ago (``-t all``, up to the cluster's MinJobAge)."""
        if not jobs and not names:
            return []
        rows: list[JobRow] = []
        argv = ["squeue", "--noheader", "-r", "-t", "all", "-o", "%F|%K|%j|%T|%r"]
        argv += [f"--jobs={','.join(jobs)}"] if jobs else [f"--name={','.join(names)}"]
        # squeue refuses the whole call when every listed job has left slurmctld's memory.
        text = self.run(argv, check=False)
        for line in text.splitlines():
            parts = line.split("|")
            if len(parts) < 5:
                continue
            rows.append(JobRow(array_job=parts[0], index=_index(parts[1]), name=parts[2], state=parts[3],
                               reason=parts[4] if parts[4] not in ("None", "(null)") else ""))
        return rows

    def sacct(self, *, jobs: Sequence[str] = (), names: Sequence[str] = ()) -> list[JobRow]:
        """One sacct call (allocations only, -X) for these jobs or job names."""
        if not jobs and not names:
            return []
        argv = ["sacct", "--parsable2", "--noheader", "-X", "--format=JobID,JobName,State,ExitCode,Reason"]
        argv += [f"--jobs={','.join(jobs)}"] if jobs else [f"--name={','.join(names)}", "--starttime=now-30days"]
        return parse_sacct(self.run(argv))

    def scancel(self, jobs: Sequence[str]) -> None:
        if jobs:
            self.run(["scancel", *jobs], check=False)


def parse_sacct(text: str) -> list[JobRow]:
    rows: list[JobRow] = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) < 4:
            continue
        job_id, name, state, exit_code = parts[:4]
        reason = parts[4] if len(parts) > 4 and parts[4] not in ("None", "(null)") else ""
        base, _, idx = job_id.partition("_")
        state = state.split()[0] if state else ""  # "CANCELLED by 0"
        if idx.startswith("["):  # a pending range: [0-99%4]
            for i in _expand(idx.strip("[]").split("%")[0]):
                rows.append(JobRow(base, i, name, state, reason, exit_code))
            continue
        rows.append(JobRow(base, int(idx) if idx.isdigit() else None, name, state, reason, exit_code))
    return rows


def _expand(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        if a.isdigit():
            out += list(range(int(a), int(b) + 1)) if b.isdigit() else [int(a)]
    return out


def _index(text: str) -> int | None:
    return int(text) if text.isdigit() else None


def _fields(line: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for word in line.split():
        k, sep, v = word.partition("=")
        if sep:
            out[k] = v
    return out
