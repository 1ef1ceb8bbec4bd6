"""``corral doctor --backend slurm``: the cluster's client commands, accounting, the run folder's
filesystem, and why a run's tasks wait (squeue's pending reasons, each with the fix)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from corral.backends.slurm.client import SlurmClient
from corral.doctor import Finding, Level
from corral.errors import CorralError
from corral.model import RunRecord, TaskRecord, TaskState

# Filesystems that every node of a cluster can mount (as opposed to a node's own disk).
SHARED_FS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "fuse.glusterfs", "glusterfs",
             "panfs", "wekafs", "fuse.sshfs", "cifs", "smb3", "fuse.weka", "orangefs", "pvfs2"}

# squeue's pending reasons (man squeue, JOB REASON CODES) → what it means, what to do.
PENDING_REASONS = {
    "Resources": ("waiting for free CPUs, memory or GPUs on the nodes it can use",
                  "nothing to fix if the cluster is busy; ask for less (resources:) or another partition to start sooner"),
    "Priority": ("jobs of higher priority are ahead of it in the queue",
                 "wait; `sprio -j JOBID` shows its priority, `sshare` your fair-share"),
    "Dependency": ("waiting for the stage it needs", "nothing to fix: it starts when that task ends"),
    "DependencyNeverSatisfied": ("a task it needs failed", "see `corral status --tasks`; fix it and `corral resume`"),
    "QOSMaxJobsPerUserLimit": ("your QOS caps how many jobs you may run at once",
                               "wait, or use a QOS with a higher limit (slurm: qos:); `sacctmgr show qos` lists them"),
    "QOSMaxSubmitJobPerUserLimit": ("your QOS caps how many jobs you may have queued",
                                    "submit fewer items at once, or ask for a higher MaxSubmitJobsPerUser"),
    "AssocMaxJobsLimit": ("your account caps how many jobs you may run at once",
                          "wait, or ask the cluster's admins to raise MaxJobs for your association"),
    "AssocGrpCPULimit": ("your account's group has used its CPU allowance", "wait, or use another account (slurm: account:)"),
    "ReqNodeNotAvail": ("a node it needs is down, drained or reserved",
                        "`sinfo -R` says why; choose another partition (slurm: partition:) or wait for the node"),
    "PartitionTimeLimit": ("its --time is above the partition's MaxTime",
                           "lower the stage's timeout (× tries) or choose a partition with a longer MaxTime"),
    "PartitionNodeLimit": ("it asks for more nodes than the partition allows", "choose another partition"),
    "PartitionDown": ("the partition is down", "choose another partition (slurm: partition:) or ask the admins"),
    "PartitionInactive": ("the partition is inactive", "choose another partition (slurm: partition:)"),
    "JobArrayTaskLimit": ("the stage's max_parallel (%K) holds it back", "nothing to fix: the cap is the workflow's"),
    "BeginTime": ("it was submitted to start later", "nothing to fix"),
    "JobHeldUser": ("held by its user", "`scontrol release JOBID`"),
    "JobHeldAdmin": ("held by an administrator", "ask the cluster's admins"),
    "InvalidAccount": ("the account does not exist or you may not use it", "fix slurm: account: (`sacctmgr show assoc user=$USER`)"),
    "InvalidQOS": ("the QOS does not exist or you may not use it", "fix slurm: qos: (`sacctmgr show assoc user=$USER format=qos`)"),
}


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding ``path`` (from /proc/self/mounts)."""
    p = path.resolve()
    while not p.exists():
        p = p.parent
    best, kind = "", "unknown"
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (str(p) == mnt or str(p).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, kind = mnt, parts[2]
    return kind


def slurm_checks(client: SlurmClient, home: Path, *, run: RunRecord | None = None,
                 tasks: Sequence[TaskRecord] = ()) -> list[Finding]:
    out: list[Finding] = []
    for exe in ("sbatch", "squeue", "scancel", "scontrol", "sacct"):
        if not client.available(exe):
            level: Level = "warn" if exe == "sacct" else "error"
            out.append(Finding("slurm-client", level, f"{exe} is not on PATH",
                               "run corral on a login node, or `module load slurm`", exe))
    if any(f.level == "error" for f in out):
        return out
    try:
        config = client.config
    except CorralError as exc:
        return [*out, Finding("slurm-controller", "error", exc.one_line(), exc.hint or "", "slurmctld")]
    out.append(Finding("slurm-controller", "ok", f"slurmctld answers (cluster {config.get('ClusterName', '?')}, "
                       f"MaxArraySize {client.max_array_size})", "", "slurmctld"))
    if client.accounting:
        try:
            client.run(["sacct", "--noheader", "-X", "-n", "--starttime=now-1hours", "-o", "JobID"])
            out.append(Finding("slurm-accounting", "ok", "accounting answers: status reads one `sacct` per refresh"))
        except CorralError as exc:
            out.append(Finding("slurm-accounting", "warn", f"accounting is configured but sacct fails: {exc.one_line()}",
                               "ask the admins for read access; corral falls back to squeue", "sacct"))
    else:
        out.append(Finding("slurm-accounting", "info",
                           "the cluster keeps no accounting (AccountingStorageType=none): status reads squeue, which "
                           f"forgets ended jobs after MinJobAge ({config.get('MinJobAge', '?')}); the attempt records "
                           "in the run folder decide after that", "", "sacct"))
    nodes = 0
    with contextlib.suppress(CorralError):
        nodes = len(client.nodes())
    kind = fs_type(home)
    if kind in SHARED_FS:
        out.append(Finding("slurm-shared-fs", "ok", f"CORRAL_HOME ({home}) is on {kind}, which nodes can share"))
    elif nodes > 1:
        out.append(Finding("slurm-shared-fs", "error",
                           f"CORRAL_HOME ({home}) is on {kind}, a filesystem of this machine only, and the cluster has "
                           f"{nodes} nodes: jobs cannot read their item tables nor write their records",
                           "export CORRAL_HOME=/a/shared/folder (home or project space on NFS, Lustre, GPFS …)", str(home)))
    else:
        out.append(Finding("slurm-shared-fs", "info",
                           f"CORRAL_HOME ({home}) is on {kind}; fine for this one-node cluster, not for more nodes",
                           "on a real cluster put CORRAL_HOME on a shared filesystem", str(home)))
    if run is not None:
        out += pending_findings(tasks)
    return out


def pending_findings(tasks: Sequence[TaskRecord]) -> list[Finding]:
    """Why tasks wait, grouped per stage and reason (from the `pending: Reason` the refresh recorded)."""
    counts: Counter[tuple[str, str]] = Counter()
    for t in tasks:
        if t.state == TaskState.SUBMITTED and t.reason.startswith("pending: "):
            counts[(t.stage, t.reason.removeprefix("pending: ").strip())] += 1
    out = []
    for (stage, reason), n in sorted(counts.items()):
        key = reason.split(",")[0].split("(")[0].strip()
        what, fix = PENDING_REASONS.get(key, (f"Slurm says {reason}", "`man squeue` (JOB REASON CODES) explains it"))
        level: Level = "info" if key in ("Dependency", "JobArrayTaskLimit", "BeginTime", "Priority", "Resources") else "warn"
        out.append(Finding("slurm-pending", level, f"{n} task(s) of stage {stage!r} pending ({reason}): {what}", fix,
                           stage))
    return out
