"""Pure functions: a stage's tasks → the item table, the batch script and the sbatch options.

Nothing here runs Slurm. The same plan gives byte-identical tables and scripts on every machine.

The run folder (``$CORRAL_HOME/runs/<run>``, on a filesystem the compute nodes share)::

    slurm/wrapper.sh                 the sh wrapper every array task runs (:data:`WRAPPER`)
    slurm/tables/<job name>.tab      one line per array index: that task's row, or ``-`` (padding)
    slurm/scripts/<job name>.sh      the batch script: ``#SBATCH`` lines, then the wrapper
    slurm/records/<task>.<n>.json    one small JSON file per attempt, written by the wrapper
    logs/<stage>/<job id>_<index>.out|.err   Slurm's ``%A_%a`` output files, one pair per array task
    workspace/                       ``CORRAL_WORKDIR``

A row is POSIX sh, ``eval``-ed by the wrapper: ``_c_t=<task id> _c_b=<attempts before> _c_n=<tries>;``
then ``export NAME='value'`` for every variable of the local backend's environment (item fields, as
``NAME`` and ``CORRAL_ITEM_NAME``, and every ``CORRAL_*``), secrets read at run time (``env:VAR`` from
the environment sbatch propagates, ``file:PATH`` read on the node — never written to the table), then
``set -- <argv>``: the argv exactly as the local backend builds it (``/bin/sh -c`` with shell-quoted
placeholders for a string command). Values holding newlines stay on one line (``'"$NL"'``).

Array index ``k`` of chunk ``c`` is item ``c * size + k`` (``size`` = the cluster's MaxArraySize), in
every stage and every round: per-item chains use ``aftercorr`` (Slurm's N-to-N), which needs equal
indices. A task that has nothing to do (already succeeded, outputs exist) keeps its index with a
padding row ``-`` that exits 0 at once.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from corral.backends.oom import OOM_COUNTER_SH
from corral.errors import BackendError
from corral.plan import Task
from corral.spec import SlurmSettings, Stage
from corral.units import format_size_mib

PADDING_ROW = "-"
SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")

WRAPPER = r"""#!/bin/sh
# corral: run array task ${SLURM_ARRAY_TASK_ID} of the item table "$1"; see corral/backends/slurm/script.py
NL='
'
_c_row=$(sed -n "$((${SLURM_ARRAY_TASK_ID:-0} + 1))p" "$1")
if [ -z "$_c_row" ]; then echo "corral: no row ${SLURM_ARRAY_TASK_ID:-0} in $1" >&2; exit 97; fi
if [ "$_c_row" = "-" ]; then exit 0; fi
_c_rec=$2
_c_job="${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-}}_${SLURM_ARRAY_TASK_ID:-0}"
_c_host=$(hostname 2>/dev/null || echo unknown)
eval "$_c_row" || { echo "corral: cannot read row ${SLURM_ARRAY_TASK_ID:-0} of $1" >&2; exit 97; }
_c_now() { date +%s.%N 2>/dev/null | sed 's/\.N*$//' || date +%s; }
_c_write() {  # attempt state exit_code reason start end [final]
  _c_f="$_c_rec/$_c_t.$1.json"
  if [ -n "${7:-}" ] || [ "$1" -ge "$((_c_b + _c_n))" ]; then _c_fin=true; else _c_fin=false; fi
  printf '{"task":"%s","attempt":%s,"state":"%s","exit_code":%s,"reason":"%s","start":%s,"end":%s,"job":"%s","host":"%s","final":%s}\n' \
    "$_c_t" "$1" "$2" "$3" "$4" "$5" "$6" "$_c_job" "$_c_host" "$_c_fin" > "$_c_f.tmp" && mv -f "$_c_f.tmp" "$_c_f"
}
_c_a=$_c_b
_c_code=0
_c_pid=
_c_start=null
_c_term() {
  kill "$_c_pid" 2>/dev/null
  _c_write "$_c_a" FAILED 143 "stopped by Slurm (time limit, scancel or preemption)" "$_c_start" "$(_c_now)" final
  exit 143
}
_c_missing() {  # the first declared output (local path _c_oN, as written _c_uN) that does not exist
  _c_i=1
  while [ "$_c_i" -le "${_c_on:-0}" ]; do
    eval "_c_p=\$_c_o$_c_i"
    if [ ! -e "$_c_p" ]; then eval "_c_miss=\$_c_u$_c_i"; return 0; fi
    _c_i=$((_c_i + 1))
  done
  return 1
}
trap _c_term TERM INT
OOM_COUNTER_SH
if [ -n "${CORRAL_WORKDIR:-}" ]; then mkdir -p "$CORRAL_WORKDIR" 2>/dev/null || true; fi
while [ "$_c_a" -lt "$((_c_b + _c_n))" ]; do
  _c_a=$((_c_a + 1))
  _c_start=$(_c_now)
  _c_write "$_c_a" RUNNING null "" "$_c_start" null
  _c_oom0=$(_c_ooms)
  echo "corral: attempt $_c_a of ${CORRAL_STAGE}[${CORRAL_ITEM_KEY}] (task $_c_t) on $_c_host" >&2
  if [ -n "${_c_to:-}" ] && command -v timeout >/dev/null 2>&1; then
    timeout -k 5 "$_c_to" "$@" < /dev/null &
  else
    "$@" < /dev/null &
  fi
  _c_pid=$!
  wait "$_c_pid"
  _c_code=$?
  if [ -n "${_c_to:-}" ] && [ "$_c_code" -eq 124 ]; then
    _c_write "$_c_a" FAILED 124 "timed out after ${_c_to}s" "$_c_start" "$(_c_now)"
    continue
  fi
  if [ "$_c_code" -eq 0 ] && _c_missing; then
    _c_write "$_c_a" FAILED 0 "declared output missing: $_c_miss" "$_c_start" "$(_c_now)"
    echo "corral: declared output missing: $_c_miss" >&2
    _c_code=1
    continue
  fi
  if [ "$_c_code" -eq 0 ]; then
    _c_write "$_c_a" SUCCEEDED 0 "" "$_c_start" "$(_c_now)"
    exit 0
  fi
  if [ "$_c_code" -eq 137 ] && [ "$(_c_ooms)" -gt "$_c_oom0" ]; then
    # the kernel killed it for memory: with retry_memory (_c_g) no try at this --mem; corral resubmits with more
    _c_why="out of memory (limit ${_c_m:-?}): killed by the kernel (exit 137)"
    echo "corral: $_c_why" >&2
    if [ -n "${_c_g:-}" ]; then _c_write "$_c_a" FAILED 137 "$_c_why" "$_c_start" "$(_c_now)" final; exit 137; fi
    _c_write "$_c_a" FAILED 137 "$_c_why" "$_c_start" "$(_c_now)"
    continue
  fi
  if [ "$_c_code" -gt 128 ]; then _c_why="killed by signal $((_c_code - 128))"; else _c_why="exit code $_c_code"; fi
  _c_write "$_c_a" FAILED "$_c_code" "$_c_why" "$_c_start" "$(_c_now)"
done
exit "$_c_code"
""".replace("OOM_COUNTER_SH\n", OOM_COUNTER_SH)


def sh_word(value: str) -> str:
    """One POSIX sh word on one line: bare when safe, else single-quoted; newlines as ``'"$NL"'``."""
    if value and SAFE.match(value):
        return value
    return "'" + value.replace("'", "'\\''").replace("\n", "'\"$NL\"'") + "'"


def secret_exports(stage: Stage) -> list[str]:
    """``export NAME=...`` read at run time: ``env:VAR`` from the job's environment, ``file:PATH`` on the node."""
    out = []
    for name, ref in stage.secrets.items():
        source, _, key = ref.partition(":")
        if source == "env" and key:
            msg = f"corral: secret {name} comes from {key}, which is not in the job's environment"
            out.append(f'export {name}="${{{key}?{msg}}}"')
        elif source == "file" and key:
            out.append(f"export {name}=\"$(cat {sh_word(key)})\"")
        else:
            raise BackendError(
                f"stage {stage.name!r}: secret {name} = {ref!r} cannot be read on Slurm",
                "write `env:VARIABLE` (read from the environment sbatch passes on) or `file:path` "
                "(a file the compute nodes can read)",
            )
    return out


def row(task: Task, env: Mapping[str, str], argv: Sequence[str], *, attempts_before: int, tries: int,
        outputs: Sequence[tuple[str, str]] = (), memory_mib: int | None = None) -> str:
    """``outputs``: (local path, output as declared and rendered) the wrapper checks after exit 0.
    ``memory_mib``: the job's ``--mem`` (named in an out-of-memory reason); with ``retry_memory`` the
    wrapper stops at an out-of-memory kill (``_c_g``) and corral resubmits the task with more."""
    timeout = f" _c_to={math.ceil(task.stage.timeout)}" if task.stage.timeout else ""
    mem = format_size_mib(memory_mib or task.stage.resources.memory)
    grow = " _c_g=1" if task.stage.resources.retry_memory is not None else ""
    parts = [f"_c_t={task.id} _c_b={attempts_before} _c_n={tries}{timeout} _c_m={mem}{grow}"]
    if outputs:
        parts.append(f"_c_on={len(outputs)}")
        for i, (path, shown) in enumerate(outputs, 1):
            parts.append(f"_c_o{i}={sh_word(path)} _c_u{i}={sh_word(shown)}")
    parts[-1] += ";"
    if env:
        parts.append("export " + " ".join(f"{k}={sh_word(v)}" for k, v in env.items()) + ";")
    parts += [e + ";" for e in secret_exports(task.stage)]
    parts.append("set -- " + " ".join(sh_word(a) for a in argv))
    return " ".join(parts)


def chunk_of(index: int | None, size: int) -> tuple[int, int]:
    """(chunk, array index) of an item index; a per-run task is chunk 0, index 0."""
    if index is None:
        return 0, 0
    return index // size, index % size


def chunk_count(n_items: int, size: int) -> int:
    return max(1, math.ceil(n_items / size))


def array_spec(indices: Sequence[int], max_parallel: int | None) -> str:
    """``--array`` value: ranges of the indices that run, ``%K`` when a stage caps its parallelism."""
    idx = sorted(indices)
    parts: list[str] = []
    start = prev = idx[0]
    for i in idx[1:]:
        if i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}-{prev}" if prev > start else str(start))
        start = prev = i
    parts.append(f"{start}-{prev}" if prev > start else str(start))
    spec = ",".join(parts)
    return f"{spec}%{max_parallel}" if max_parallel else spec


def slurm_time(seconds: float) -> str:
    """``--time`` in Slurm's ``D-HH:MM:SS``, rounded up to whole minutes (Slurm's granularity)."""
    minutes = max(1, math.ceil(seconds / 60))
    d, rest = divmod(minutes, 1440)
    h, m = divmod(rest, 60)
    return f"{d}-{h:02d}:{m:02d}:00"


@dataclass(frozen=True)
class Placement:
    partition: str | None
    account: str | None
    qos: str | None
    extra: tuple[str, ...]


def placement(stage: Stage, settings: SlurmSettings) -> Placement:
    o = settings.stages.get(stage.name)
    return Placement(
        partition=(o.partition if o and o.partition else settings.partition),
        account=(o.account if o and o.account else settings.account),
        qos=(o.qos if o and o.qos else settings.qos),
        extra=tuple(settings.extra) + (tuple(o.extra) if o else ()),
    )


def sbatch_options(stage: Stage, settings: SlurmSettings, *, job_name: str, array: str, log_dir: str,
                   chdir: str, memory_mib: int | None = None) -> list[str]:
    """The ``#SBATCH`` options of one array (dependencies go on the command line); ``memory_mib``:
    ``--mem`` when it is not the stage's (a resubmission after an out-of-memory kill)."""
    r = stage.resources
    p = placement(stage, settings)
    opts = [
        f"--job-name={job_name}",
        f"--array={array}",
        "--ntasks=1",
        f"--cpus-per-task={max(1, math.ceil(r.vcpus))}",
        f"--mem={memory_mib or r.memory}M",
        f"--output={log_dir}/%A_%a.out",
        f"--error={log_dir}/%A_%a.err",
        f"--chdir={chdir}",
        "--kill-on-invalid-dep=yes",
        "--export=ALL",  # secrets (env:VAR), PATH and modules come from the submitting environment
        "--open-mode=append",
    ]
    if r.gpus:
        opts.append(f"--gres=gpu:{r.gpus}")
    if r.disk:
        opts.append(f"--tmp={r.disk}G")
    if stage.timeout:
        # The wrapper runs every try inside one job (each under `timeout`), so Slurm's limit covers them all.
        opts.append(f"--time={slurm_time((stage.timeout + 10) * (stage.retries + 1))}")
    if p.partition:
        opts.append(f"--partition={p.partition}")
    if p.account:
        opts.append(f"--account={p.account}")
    if p.qos:
        opts.append(f"--qos={p.qos}")
    opts += list(p.extra)
    return opts


def batch_script(options: Sequence[str], wrapper: str, table: str, records: str) -> str:
    lines = ["#!/bin/sh"] + [f"#SBATCH {o}" for o in options]
    lines.append(f"exec /bin/sh {shlex.quote(wrapper)} {shlex.quote(table)} {shlex.quote(records)}")
    return "\n".join(lines) + "\n"


def job_name(run_id: str, stage: str, round_no: int, chunk: int) -> str:
    """Deterministic, so a crashed submission is found again by name (``squeue --name``)."""
    return f"corral.{run_id}.{stage}.r{round_no}.c{chunk}"
