"""Pure functions: a stage or a chunk of tasks → the kwargs of Batch's RegisterJobDefinition / SubmitJob.

Nothing here calls AWS; everything is deterministic, so the same plan gives byte-identical payloads
(and job definition names) on every machine and on every resume.

Job definitions
---------------
One job definition per distinct *runtime* (image, resources, retries, timeout, roles, secrets, EFS
mount), not per stage and never per job: the per-task parts (command, item fields) travel in the
SubmitJob container overrides. The definition is named ``corral-<16 hex>`` from a SHA-256 of its
content (the wrapper script included), so an ACTIVE definition with that name has exactly that
content and is reused (``describe`` before ``register``).

The item table (how each array child gets its own item)
--------------------------------------------------------
An array job of ``n`` children carries, in its container overrides' environment:

``CORRAL_TABLE``
    ``base64(gzip(rows))``: ``n`` lines of UTF-8 text, line ``k`` (0-based) for the child with
    ``AWS_BATCH_JOB_ARRAY_INDEX=k`` (line 0 for a plain job). A line is the values of the columns,
    each a POSIX sh word (bare when made of safe characters, else single-quoted with ``'`` written
    as ``'\\''`` and a newline as ``'"$NL"'`` so every row is one line), separated by spaces:
    ``s001 4f2a… 'with space'``. A padding row (a child
    whose task already succeeded, kept only to align N_TO_N children on resume) is ``-``.
``CORRAL_COLUMNS``
    the names the row's values are exported as, in order: ``CORRAL_ITEM_<field>`` for fields
    that differ between tasks, ``CORRAL_TASK_ID`` (only when the stage uses it, see below),
    ``CORRAL_ITEM_KEY``, ``CORRAL_ITEM_INDEX``, stage ``env`` values that hold placeholders, and
    ``CORRAL_ARGV`` when the command is per row.
``CORRAL_FIELDS``
    item fields also exported under their plain name (``session`` from ``CORRAL_ITEM_session``).
``CORRAL_KEY_FROM``, ``CORRAL_INDEX_BASE`` (optional)
    when every item key equals one field, the column it is copied from; when a chunk's items are
    consecutive, the index of its first item (``CORRAL_ITEM_INDEX`` = base + array index). Both
    keep repeated values out of the rows.
``CORRAL_ARGV``
    the task's argv as sh words, ``eval``-ed after the exports. A command whose placeholders all
    stand outside quotes is rendered once per stage with references: ``convert {session}`` runs as
    ``/bin/sh -c 'convert "${CORRAL_ITEM_session}"'`` — the same words as the local backend's
    shell-quoted values; list commands become double-quoted words with ``${...}`` references.
    Otherwise (a placeholder inside quotes or a heredoc) the argv is rendered per task, exactly as
    locally, and travels as a column.
``CORRAL_RUN_ID``, ``CORRAL_STAGE``, ``CORRAL_WORKDIR`` and every env value equal for all the
    stage's tasks are plain override variables.

The job definition's command is ``/bin/sh -c WRAPPER`` (:data:`WRAPPER`): it decodes the table
with ``base64 -d | gzip -dc``, takes line ``AWS_BATCH_JOB_ARRAY_INDEX + 1`` with ``sed``, exports
the columns and fields, unsets its own variables and ``exec``s the argv. It needs only ``/bin/sh``,
``base64``, ``gzip`` and ``sed`` (coreutils or busybox): no python, corral or aws CLI in the image.
Chunks are cut so every payload stays under :data:`PAYLOAD_LIMIT`.

Task ids (16 hex digits each, incompressible) would dominate the compressed rows (~11 of ~15 bytes
a row), so ``CORRAL_TASK_ID`` is a column only for a stage that uses the task id
(:func:`uses_task_id`: ``{task}`` or ``CORRAL_TASK_ID`` in its command, env values or transfer
``from``/``to``): elsewhere an AWS child does not get ``CORRAL_TASK_ID`` (``AWS_BATCH_JOB_ID``
identifies it) and rows hold only the item's own values — several thousand items per SubmitJob.
Nothing maps a child back to its task through its row: the layout does (the job name gives the
stage, round and chunk; child ``k`` is item ``CORRAL_INDEX_BASE + k``, or the row's
``CORRAL_ITEM_INDEX`` when the round's items are not consecutive — :func:`child_item_index`).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.errors import PlanError
from corral.plan import Task
from corral.spec import Stage

PAYLOAD_LIMIT = 30 * 1024  # SubmitJob request body (Batch service quotas: "SubmitJob payload 30 KiB")
PAYLOAD_MARGIN = 2048  # room for dependsOn (≤ 20 entries), tags and the JSON framing
# ECS RunTask API reference, `overrides`: "A total of 8192 characters are allowed for overrides. This
# limit includes the JSON formatting characters of the override structure." Batch launches every job
# and array child as an ECS task whose container override holds the command (the job definition's),
# the environment and the resource requirements, plus variables Batch adds itself (AWS_BATCH_JOB_ID,
# _JOB_ATTEMPT, _JQ_NAME, _CE_NAME, _JOB_ARRAY_INDEX, ...). Over it, SubmitJob accepts the job and
# every child FAILS at launch ("Container Overrides length must be at most 8192", ASFHyP3/hyp3#3041).
ECS_OVERRIDES_LIMIT = 8192
JOB_DEFINITION_LIMIT = 24 * 1024  # Batch service quotas: "job definition size 24 KiB"
BATCH_VARIABLES_RESERVE = 768  # what Batch's own variables may take (measured ~430 with 128-char names)
OVERRIDES_MARGIN = 512  # kept free below the limit: JSON escaping differences, future Batch variables
MAX_ARRAY_SIZE = 10_000
MAX_DEPENDS_ON = 20
MIN_TIMEOUT = 60
MAX_ATTEMPTS = 10
EFS_VOLUME = "corral-efs"
EFS_MOUNT = "/mnt/corral"
TABLE_VAR = "CORRAL_TABLE"
RESERVED_ENV_PREFIXES = ("AWS_BATCH_", "ECS_")  # names AWS Batch sets in every job

WRAPPER = """set -eu
NL='
'
i=${AWS_BATCH_JOB_ARRAY_INDEX:-0}
row=$(printf '%s' "$CORRAL_TABLE" | base64 -d | gzip -dc | sed -n "$((i + 1))p")
unset CORRAL_TABLE
if [ -z "$row" ]; then echo "corral: no row $i in the item table" >&2; exit 97; fi
if [ "$row" = "-" ]; then echo "corral: row $i has nothing to run (already done)" >&2; exit 0; fi
eval "set -- $row"
for c in ${CORRAL_COLUMNS:-}; do eval "export $c=\"\\$1\""; shift; done
for f in ${CORRAL_FIELDS:-}; do eval "export $f=\"\\$CORRAL_ITEM_$f\""; done
if [ -n "${CORRAL_KEY_FROM:-}" ]; then eval "export CORRAL_ITEM_KEY=\"\\$$CORRAL_KEY_FROM\""; fi
if [ -n "${CORRAL_INDEX_BASE:-}" ]; then export CORRAL_ITEM_INDEX=$((CORRAL_INDEX_BASE + i)); fi
outs=${CORRAL_OUTPUTS:-}
ins=${CORRAL_INPUTS:-}
skip=${CORRAL_SKIP_DONE:-}
eval "set -- $CORRAL_ARGV"
unset CORRAL_ARGV CORRAL_COLUMNS CORRAL_FIELDS CORRAL_KEY_FROM CORRAL_INDEX_BASE CORRAL_OUTPUTS CORRAL_INPUTS CORRAL_SKIP_DONE CORRAL_WRAPPER NL c f i row
if [ -n "${CORRAL_WORKDIR:-}" ]; then mkdir -p "$CORRAL_WORKDIR" 2>/dev/null || true; fi
if [ -n "${CORRAL_PROGRAM:-}" ]; then set -- /bin/sh -c "$CORRAL_PROGRAM" corral-program "$@"; fi
r=${CORRAL_RETRIES:-0}
t=${CORRAL_TRY_TIMEOUT:-}
ev=${CORRAL_OOM_EVENTS:-}
unset CORRAL_PROGRAM CORRAL_RETRIES CORRAL_TRY_TIMEOUT CORRAL_OOM_EVENTS
if [ -n "$t" ] && command -v timeout >/dev/null 2>&1; then set -- timeout -s TERM "$t" "$@"; fi
check_outputs() {
  eval "set -- $outs"
  while [ $# -gt 1 ]; do
    if [ ! -e "$2" ]; then echo "corral: declared output missing: $2" >&2; return $((OUTPUT_MISSING_BASE + $1)); fi
    shift 2
  done
}
oo() { for f in $ev /sys/fs/cgroup/memory.events /sys/fs/cgroup/memory/memory.oom_control; do
  if [ -r "$f" ]; then x=$(sed -n 's/^oom_kill //p' "$f"); echo "${x:-0}"; return 0; fi; done; echo 0; }
newer_input() {
  o=$1
  eval "set -- $ins"
  for x in "$@"; do if [ "$x" -nt "$o" ]; then return 0; fi; done
  return 1
}
outputs_done() {
  eval "set -- $outs"
  while [ $# -gt 1 ]; do
    if [ ! -e "$2" ]; then return 1; fi
    if [ -n "$ins" ] && newer_input "$2"; then return 1; fi
    shift 2
  done
}
if [ -n "$skip" ] && [ -n "$outs" ] && [ "${AWS_BATCH_JOB_ATTEMPT:-1}" -eq 1 ] && outputs_done; then
  echo "SKIP_MARK ${CORRAL_RUN_ID:-} ${AWS_BATCH_JOB_ID:-} (outputs exist: the command did not run)" >&2
  exit 0
fi
oom0=$(oo)
"$@" &
p=$!
stop=
trap 'stop=1; kill -TERM "$p" 2>/dev/null || :' TERM INT HUP
set +e
wait "$p"
rc=$?
while kill -0 "$p" 2>/dev/null; do wait "$p"; rc=$?; done
if [ "$rc" -eq 0 ] && [ -n "$outs" ]; then check_outputs; rc=$?; fi
set -e
if [ "$rc" -eq 137 ] && [ "$(oo)" -gt "$oom0" ]; then
  echo "corral: killed for memory (exit 137): not re-run with the same memory" >&2; exit 137; fi
a=${AWS_BATCH_JOB_ATTEMPT:-1}
if [ "$rc" -ne 0 ] && [ -z "$stop" ] && [ "$a" -le "$r" ]; then
  echo "corral: the command exited $rc; retry $a of $r" >&2
  exit RETRY_EXIT
fi
if [ "$rc" -eq RETRY_EXIT ]; then echo "corral: the command exited RETRY_EXIT (corral's retry code): recorded as 1" >&2; rc=1; fi
exit "$rc"
"""

BARRIER_COMMAND = ["/bin/sh", "-c", ":"]


def wrapper(program: str | None = None) -> str:
    """The job definition's script: :data:`WRAPPER`. A ``program`` (the transfer script of a stage
    whose command corral builds) travels beside it as ``CORRAL_PROGRAM`` (see :func:`job_definition`)
    and runs with the row's argv as its arguments (``"$@"``): once per job definition, not per row."""
    return WRAPPER

# -- declared outputs, checked in the job (issue 14) -----------------------------------------------
# A task that exits 0 without writing a declared output fails: the wrapper checks the outputs it
# can see (workspace:// on the job's EFS mount, absolute paths) and exits OUTPUT_MISSING_BASE + i
# for the first missing output i of the stage's `outputs:`; refresh names the path in the reason.
# (A command that itself exits 200..249 in a stage with outputs is reported the same way.)
OUTPUT_MISSING_BASE = 200
MAX_CHECKED_OUTPUTS = 50
# `retries: N` (issue 14): each try of the command is one Batch attempt, so Batch keeps each try's
# exit code, times and log stream and corral records the same attempts as locally. A try that
# fails while AWS_BATCH_JOB_ATTEMPT <= N exits RETRY_EXIT, which the retry strategy retries; the
# last try exits the command's own code, which it does not. (Batch user guide, "Automated job
# retries"; AWS_BATCH_JOB_ATTEMPT: "Batch job environment variables".)
RETRY_EXIT = 250
# Skip-if-done in the job (issue 14), for a stage whose outputs only a job sees (workspace://, on
# EFS): with CORRAL_SKIP_DONE in its overrides (not --force), the first attempt of a task whose
# outputs all exist, none older than an input the job can see, exits 0 without running the command
# and logs SKIP_MARK <run> <job id>; the refresh finds those lines (one FilterLogEvents) and records
# the task SKIPPED, "outputs exist" (backend._skipped_in_job).
SKIP_MARK = "corral-skipped"
WRAPPER = (WRAPPER.replace("OUTPUT_MISSING_BASE", str(OUTPUT_MISSING_BASE)).replace("RETRY_EXIT", str(RETRY_EXIT))
           .replace("SKIP_MARK", SKIP_MARK))


def outputs_words(stage: Stage) -> str:
    """``CORRAL_OUTPUTS``: pairs ``index "path"`` (sh words with ``${...}`` references, as the
    argv template) of the stage's outputs a job can check itself; "" when there are none."""
    from corral.plan import parse_template

    words = []
    for i, uri in enumerate(stage.outputs[:MAX_CHECKED_OUTPUTS]):
        if uri.startswith("workspace://"):
            text = '"${CORRAL_WORKDIR}/' + "".join(
                _dq(v) if k == "text" else _reference(v) for k, v in parse_template(uri[len("workspace://"):]))
        elif uri.startswith("/"):
            text = '"' + "".join(_dq(v) if k == "text" else _reference(v) for k, v in parse_template(uri))
        else:
            continue  # s3:// and remotes: the submitter checks them; relative paths mean nothing in a job
        words.append(f'{i} {text}"')
    return " ".join(words)


def _path_word(uri: str) -> str | None:
    """A path as the job sees it, as one sh word with ``${...}`` references (None: not in the job's reach)."""
    from corral.plan import parse_template

    if uri.startswith("workspace://"):
        return '"${CORRAL_WORKDIR}/' + "".join(
            _dq(v) if k == "text" else _reference(v) for k, v in parse_template(uri[len("workspace://"):])) + '"'
    if uri.startswith("/"):
        return '"' + "".join(_dq(v) if k == "text" else _reference(v) for k, v in parse_template(uri)) + '"'
    return None


def in_job_skip(stage: Stage) -> bool:
    """True when skip-if-done is the job's to check: every output is one the job sees (workspace://
    or an absolute path) and one at least is on the workspace, which the submitter cannot see."""
    outs = stage.outputs
    return (bool(outs) and len(outs) <= MAX_CHECKED_OUTPUTS and stage.kind not in ("transfer", "cleanup")
            and all(_path_word(u) is not None for u in outs) and any(u.startswith("workspace://") for u in outs))


def inputs_words(stage: Stage) -> str:
    """``CORRAL_INPUTS``: the stage's inputs the job can see, as sh words (for the skip's age check)."""
    return " ".join(w for u in stage.inputs if (w := _path_word(u)) is not None)


# Per-task environment names: always in the table, even when a stage has a single task.
PER_TASK_KEYS = ("CORRAL_TASK_ID", "CORRAL_ITEM_KEY", "CORRAL_ITEM_INDEX")
# Kept in each job's container overrides (short; what DescribeJobs readers use to map children to
# tasks); every other stage-wide value goes in the job definition's environment.
OVERRIDE_KEYS = ("CORRAL_RUN_ID", "CORRAL_STAGE", "CORRAL_WORKDIR", "CORRAL_COLUMNS", "CORRAL_INDEX_BASE")
WRAPPER_VAR = "CORRAL_WRAPPER"
# The job definition's command when the wrapper travels in its environment: 31 characters of the
# override budget instead of the ~1,000-2,000 of the script itself.
BOOT_COMMAND = ["/bin/sh", "-c", 'eval "$CORRAL_WRAPPER"']
CONSTANT_KEYS = ("CORRAL_RUN_ID", "CORRAL_STAGE", "CORRAL_WORKDIR")
PADDING_ROW = "-"
# What a placeholder refers to once the wrapper has exported the row.
BUILTIN_VARS = {
    "run": "CORRAL_RUN_ID", "stage": "CORRAL_STAGE", "workdir": "CORRAL_WORKDIR",
    "task": "CORRAL_TASK_ID", "item": "CORRAL_ITEM_KEY", "index": "CORRAL_ITEM_INDEX",
}


@dataclass(frozen=True)
class JobContext:
    """What job definitions need from the provisioned environment (see provision.Environment)."""

    region: str
    account_id: str
    partition: str = "aws"
    job_role_arn: str = ""
    execution_role_arn: str = ""
    log_group: str = ""
    efs_id: str = ""
    efs_access_point: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    # Fargate jobs: a public IP so they can pull images in a public subnet without NAT (aws.assign_public_ip)
    assign_public_ip: bool = True

    @staticmethod
    def from_environment(env: Any, partition: str = "aws") -> JobContext:
        """Build from a ``provision.Environment`` (or anything with the same attributes)."""
        return JobContext(
            region=env.region,
            account_id=env.account_id,
            partition=partition,
            job_role_arn=getattr(env, "job_role_arn", "") or "",
            execution_role_arn=getattr(env, "execution_role_arn", "") or "",
            log_group=getattr(env, "log_group", "") or "",
            efs_id=getattr(env, "efs_id", "") or "",
            efs_access_point=getattr(env, "efs_access_point", "") or "",
            tags=dict(getattr(env, "tags", {}) or {}),
        )


@dataclass(frozen=True)
class JobDefinitionSpec:
    name: str
    kwargs: dict[str, Any]  # RegisterJobDefinition kwargs


# -- shell encoding -------------------------------------------------------------------------------
def sh_quote(value: str) -> str:
    """Single-quote for POSIX sh, on one line (newlines become '"$NL"')."""
    if "\x00" in value:
        raise PlanError(
            "a value holds a NUL character, which cannot be passed in an environment variable",
            "remove NUL bytes from the item fields and stage env",
        )
    return "'" + value.replace("'", "'\\''").replace("\n", "'\"$NL\"'") + "'"


_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def sh_word(value: str) -> str:
    """Like :func:`sh_quote`, leaving values made only of safe characters bare (shorter rows)."""
    return value if _SAFE.match(value) else sh_quote(value)


def workdir_for(run_id: str, ctx: JobContext) -> str:
    return f"{EFS_MOUNT}/runs/{run_id}" if ctx.efs_id else f"/tmp/corral/{run_id}"


def _placeholders_unquoted(template: str) -> bool:
    """True when every placeholder of a shell command stands outside quotes (and no heredoc):
    then ``"${VAR}"`` there is the same word as the local backend's shell-quoted value."""
    from corral.plan import parse_template

    state = ""  # "", "'" or '"'
    for kind, text in parse_template(template):
        if kind == "field":
            if state:
                return False
            continue
        if "<<" in text:
            return False
        i = 0
        while i < len(text):
            ch = text[i]
            if state == "'":
                if ch == "'":
                    state = ""
            elif ch == "\\":
                i += 1
            elif state == '"':
                if ch == '"':
                    state = ""
            elif ch in "'\"":
                state = ch
            i += 1
    return True


def _dq(text: str) -> str:
    """Literal text for inside double quotes."""
    return "".join("\\" + c if c in '\\"$`' else c for c in text)


def _reference(name: str) -> str:
    return "${" + BUILTIN_VARS.get(name, f"CORRAL_ITEM_{name}") + "}"


def argv_template(stage: Stage) -> str | None:
    """The stage's argv as sh words with ``${...}`` references, or None when it must be rendered
    per task to keep the local backend's exact words (a placeholder inside quotes)."""
    from corral.plan import parse_template

    cmd = stage.command
    if cmd is None:
        return None
    if isinstance(cmd, str):
        if not _placeholders_unquoted(cmd):
            return None
        text = "".join(v if k == "text" else f'"{_reference(v)}"' for k, v in parse_template(cmd))
        return " ".join(sh_quote(a) for a in ["/bin/sh", "-c", text])
    from corral.plan import shell_script_index, template_fields

    script = shell_script_index(cmd)
    if script is not None and template_fields(cmd[script]):
        return None  # placeholders in a script for sh -c: rendered per task, quoted for where they stand
    words = []
    for arg in cmd:
        parts = parse_template(arg)
        words.append('"' + "".join(_dq(v) if k == "text" else _reference(v) for k, v in parts) + '"')
    return " ".join(words)


_SENTINEL = "Zq{}qZ"


def argv_template_of(
    tasks: Sequence[Task], argv_of: Callable[[Task], Sequence[str]], columns: Sequence[str],
) -> str | None:
    """One argv template (sh words with ``${VAR}`` references to ``columns``) that gives exactly
    ``argv_of(task)`` for every task once the wrapper has exported the task's row, or None.

    The argv is built once for a stand-in task whose per-task values are unique sentinels; each
    sentinel in it becomes a reference. The result is then checked against every task's own argv
    (sentinels replaced by the task's values): any difference (a value transformed on the way, a
    local path staged per file) keeps the per-task column."""
    import dataclasses

    if not tasks:
        return None
    names = {c: _SENTINEL.format(i) for i, c in enumerate(columns)}
    first = tasks[0]
    item = dict(first.item)
    for f in first.item:
        if f"CORRAL_ITEM_{f}" in names:
            item[f] = names[f"CORRAL_ITEM_{f}"]
    stand_in = dataclasses.replace(
        first, item=item,
        key=names.get("CORRAL_ITEM_KEY", first.key),
        id=names.get("CORRAL_TASK_ID", first.id),
        index=names.get("CORRAL_ITEM_INDEX", first.index),  # type: ignore[arg-type]
    )
    try:
        words = list(argv_of(stand_in))
    except Exception:  # noqa: BLE001 - any refusal (e.g. a local path) keeps the per-task column
        return None
    for t in tasks:
        env = t.env("", "")
        values = {names[c]: (("" if t.index is None else str(t.index)) if c == "CORRAL_ITEM_INDEX" else t.id if c == "CORRAL_TASK_ID"
                             else t.key if c == "CORRAL_ITEM_KEY" else env.get(c, "")) for c in names}

        def fill(word: str, values: dict[str, str] = values) -> str:
            return re.sub(r"Zq\d+qZ", lambda m: values.get(m.group(0), m.group(0)), word)

        try:
            want = list(argv_of(t))
        except Exception:  # noqa: BLE001
            return None
        if [fill(w) for w in words] != want:
            return None
    by_sentinel = {v: k for k, v in names.items()}
    return " ".join(
        '"' + re.sub(r"Zq\d+qZ", lambda m: "${" + by_sentinel[m.group(0)] + "}", _dq(w)) + '"' for w in words
    )


def uses_task_id(stage: Stage) -> bool:
    """True when something rendered per task for the stage's AWS job uses the task id: ``{task}``
    (or ``CORRAL_TASK_ID`` read from the environment) in the command, an env value or a transfer's
    ``from``/``to``. Corral's own transfer and cleanup commands do not use it."""
    from corral.plan import template_fields

    cmd = stage.command
    texts = [cmd] if isinstance(cmd, str) else list(cmd or [])
    texts += list(stage.env.values())
    texts += [u for u in (stage.source, stage.dest) if u]
    return any("task" in template_fields(t) or "CORRAL_TASK_ID" in t for t in texts)


class StageTable:
    """How one stage's tasks are passed to array children: constant override env + one row each.

    Built from *all* the stage's tasks (not one chunk), so rows and columns are the same whatever
    the chunking, on every machine and every resume."""

    def __init__(
        self, tasks: Sequence[Task], run_id: str, workdir: str, *, index_column: bool = True,
        argv_of: Callable[[Task], Sequence[str]] | None = None,
    ) -> None:
        """``argv_of(task)``, when given, is each task's argv: for stages whose container command is
        not the stage's ``command`` (transfers, cleanup). It becomes one stage-wide template of
        ``${...}`` references when that template gives every task's argv exactly
        (:func:`argv_template_of`), else a column rendered per task."""
        if not tasks:
            raise ValueError("a stage table needs tasks")
        self.run_id = run_id
        self.workdir = workdir
        self._argv_of = argv_of
        stage = tasks[0].stage
        envs = [t.env(run_id, workdir) for t in tasks]
        self._envs = {t.id: e for t, e in zip(tasks, envs, strict=True)}
        first = envs[0]
        constant = {k: v for k, v in first.items() if k not in PER_TASK_KEYS}
        for env in envs[1:]:
            constant = {k: v for k, v in constant.items() if env.get(k) == v}
        for k in CONSTANT_KEYS:
            constant[k] = first[k]
        fields = list(tasks[0].item)
        # Plain field names the wrapper re-exports from CORRAL_ITEM_<f> (unless something else
        # sets that name: the stage env or corral's own variables win, as in Task.env).
        from corral.plan import protected_env

        plain = [f for f in fields if f not in stage.env and not protected_env(f) and f not in constant]
        self.task_id_column = uses_task_id(stage)
        self.columns = [
            k for k in first
            if k not in constant and k not in plain and (index_column or k != "CORRAL_ITEM_INDEX")
            and (self.task_id_column or k != "CORRAL_TASK_ID")
        ]
        if len(tasks) > 1:
            for c in self.columns:
                if c.startswith("CORRAL_ITEM_") and c != "CORRAL_ITEM_KEY" and c != "CORRAL_ITEM_INDEX" and all(
                    e[c] == e["CORRAL_ITEM_KEY"] for e in envs
                ):
                    self.columns.remove("CORRAL_ITEM_KEY")
                    constant["CORRAL_KEY_FROM"] = c
                    break
        if argv_of is not None:
            # the wrapper exports the key and index whether they are columns or derived
            refs = list(dict.fromkeys([*self.columns, "CORRAL_ITEM_KEY", "CORRAL_ITEM_INDEX"]))
            argv = argv_template_of(tasks, argv_of, refs)
            if argv is not None:
                self._argv_of = None
        else:
            argv = argv_template(stage)
        if argv is None:
            self.columns.append("CORRAL_ARGV")
        else:
            constant["CORRAL_ARGV"] = argv
        for v in constant.values():
            if "\x00" in v:
                sh_quote(v)  # raises the PlanError naming the problem
        constant["CORRAL_COLUMNS"] = " ".join(self.columns)
        constant["CORRAL_FIELDS"] = " ".join(plain)
        if argv_of is None and (outs := outputs_words(stage)):
            constant["CORRAL_OUTPUTS"] = outs
            if in_job_skip(stage) and (ins := inputs_words(stage)):
                constant["CORRAL_INPUTS"] = ins
        self.env = constant
        self._per_row_argv = argv is None

    @property
    def override_env(self) -> dict[str, str]:
        """What each job of the stage carries in its container overrides besides the table: the
        few short names that identify the job and lay its rows out (:data:`OVERRIDE_KEYS`)."""
        return {k: v for k, v in self.env.items() if k in OVERRIDE_KEYS}

    @property
    def definition_env(self) -> dict[str, str]:
        """What is the same for every job of the stage: in the job definition's environment, once
        (the argv template, field names, constant values), outside ECS's override budget."""
        return {k: v for k, v in self.env.items() if k not in OVERRIDE_KEYS}

    def row(self, task: Task) -> str:
        env = self._envs.get(task.id) or task.env(self.run_id, self.workdir)
        values = []
        for c in self.columns:
            if c == "CORRAL_ARGV":
                argv = self._argv_of(task) if self._argv_of else task.command(self.run_id, self.workdir)
                values.append(" ".join(sh_quote(a) for a in argv))
            else:
                values.append(env[c])
        line = " ".join(sh_word(v) for v in values)
        assert "\n" not in line
        return line


def encode_table(rows: Sequence[str]) -> str:
    data = ("\n".join(rows) + "\n").encode()
    return base64.b64encode(gzip.compress(data, compresslevel=9, mtime=0)).decode("ascii")


def decode_table(blob: str) -> list[str]:
    """The rows of an encoded table (for tests and tools; the image uses the wrapper)."""
    return gzip.decompress(base64.b64decode(blob)).decode().split("\n")[:-1]


def row_values(columns: Sequence[str], row: str) -> dict[str, str] | None:
    """A row's values by column name (None for padding), as the wrapper exports them."""
    if row == PADDING_ROW:
        return None
    import shlex

    values = shlex.split(row.replace("'\"$NL\"'", "\n"))
    return dict(zip(columns, values, strict=True))


def child_item_index(env: Mapping[str, str], k: int, row: str) -> int | None:
    """The item index child ``k`` of a submitted job works on, from the job's override ``env`` (and
    row ``k`` of its table): ``CORRAL_INDEX_BASE + k``, else the row's ``CORRAL_ITEM_INDEX``. None for
    a padding row or a per-run job."""
    if row == PADDING_ROW:
        return None
    if env.get("CORRAL_INDEX_BASE"):
        return int(env["CORRAL_INDEX_BASE"]) + k
    values = row_values(env.get("CORRAL_COLUMNS", "").split(), row) or {}
    index = values.get("CORRAL_ITEM_INDEX", env.get("CORRAL_ITEM_INDEX", ""))
    return int(index) if index else None


# -- job definitions ------------------------------------------------------------------------------
# Fargate Spot reclaims a task with this ECS stoppedReason (Batch's statusReason); the container
# may have exited 137 meanwhile, so it is matched before the exit-code rule.
FARGATE_SPOT_REASON = "Your Spot Task was interrupted*"


# Infrastructure failures retried whatever `retries` says, up to this many extra attempts: a spot
# reclaim or instance failure (EC2 "Host EC2 ..."), a Fargate Spot interruption, an image pull that
# failed. A failing command is retried by Batch too, but only while the wrapper asks for it
# (RETRY_EXIT: attempt number <= `retries`), so `retries: N` runs a failing command 1 + N times, as
# locally; an attempt lost to the infrastructure counts among them. Batch allows 1-10 attempts.
INFRA_RETRIES = 2


def retry_strategy(retries: int, *, fargate: bool = False) -> dict[str, Any]:
    """Batch's retryStrategy: ``1 + retries + INFRA_RETRIES`` attempts (at most 10), at most 5
    rules, first match wins: infrastructure failures and the wrapper's RETRY_EXIT are retried;
    any other exit code (the command's last try) and any other reason end the job."""
    reclaim = (
        {"onStatusReason": FARGATE_SPOT_REASON, "action": "RETRY"} if fargate
        else {"onStatusReason": "Host EC2*", "action": "RETRY"}  # spot reclaim, instance failure
    )
    return {
        "attempts": min(MAX_ATTEMPTS, 1 + retries + INFRA_RETRIES),
        "evaluateOnExit": [
            reclaim,
            # ECS puts the pull error in the container's reason ("CannotPullContainerError: ..."),
            # Batch's statusReason then says "Task failed to start" (nextflow-io/nextflow#5099).
            {"onReason": "CannotPullContainerError*", "action": "RETRY"},
            {"onExitCode": str(RETRY_EXIT), "action": "RETRY"},  # the wrapper: retries remain
            {"onExitCode": "*", "action": "EXIT"},  # the command's own failure, on its last try
            {"onStatusReason": "*", "action": "EXIT"},
        ],
    }


def _secret_arn(ref: str, ctx: JobContext) -> str:
    if ref.startswith("aws:"):
        ref = ref[len("aws:") :]
    if ref.startswith("arn:"):
        return ref
    if ref.startswith("env:"):
        raise PlanError(
            f"secret reference {ref!r} names a local environment variable, which AWS Batch cannot read",
            "give a Secrets Manager secret name or ARN (or an SSM parameter ARN) for `--backend aws`",
        )
    # A partial ARN (no random suffix) is accepted by ECS/Batch for a secret in the job's region.
    return f"arn:{ctx.partition}:secretsmanager:{ctx.region}:{ctx.account_id}:secret:{ref}"


def _content_name(content: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"corral-{digest[:16]}"


def image_uri(image: str, ctx: JobContext) -> str:
    """The image as Batch pulls it: ``ecr://name:tag`` becomes the environment's registry URI
    (no API call); any other image is returned as written."""
    from corral.backends.aws_batch.ecr import resolve_image

    return resolve_image(image, account_id=ctx.account_id, region=ctx.region)


def fargate_requirements(stage: Stage) -> list[dict[str, str]]:
    """VCPU/MEMORY of the smallest Fargate size holding the stage (``"0.25"``/``"512"`` and up)."""
    from corral.routes import requirements_for

    requirements = requirements_for(stage.resources, fargate=True)
    if requirements is None:
        raise PlanError(
            f"stage {stage.name!r} does not fit Fargate (GPUs, over 16 vCPUs / 120 GiB, or over 200 GiB of disk)",
            "this is a corral bug: such a stage goes to the EC2 queue; report it with the workflow",
        )
    return requirements


def fargate_properties(ctx: JobContext, disk_gib: int | None = None) -> dict[str, Any]:
    """What a Fargate job definition adds to ``containerProperties``: its network (public IP or
    not), platform version (LATEST: EFS needs 1.4.0 or later), and ephemeral storage over the
    20 GiB every Fargate task gets (21–200 GiB)."""
    props: dict[str, Any] = {
        "networkConfiguration": {"assignPublicIp": "ENABLED" if ctx.assign_public_ip else "DISABLED"},
        "fargatePlatformConfiguration": {"platformVersion": "LATEST"},
    }
    if disk_gib is not None and disk_gib > 20:
        props["ephemeralStorage"] = {"sizeInGiB": int(disk_gib)}
    return props


def _require_execution_role(ctx: JobContext, what: str) -> None:
    if not ctx.execution_role_arn:
        raise PlanError(
            f"{what} runs on Fargate, which needs an execution role, and the environment has none",
            "run `corral aws setup` (it makes corral's execution role), or leave `fargate` out of aws.instance_types",
        )


def job_definition(
    stage: Stage, ctx: JobContext, *, fargate: bool = False, program: str | None = None,
    env: Mapping[str, str] | None = None, consumable: Mapping[str, Any] | None = None,
) -> JobDefinitionSpec:
    """RegisterJobDefinition kwargs for a stage's runtime, named from a hash of their content.

    ``fargate``: a Fargate job definition (platformCapabilities FARGATE, the size rounded up to a
    valid Fargate vCPU/memory pair, execution role, network configuration, ephemeral storage for
    the stage's disk); otherwise an EC2 one (GPUs, scratch on the instance's root volume).
    ``program``: the script the wrapper runs the row's argv with (:func:`wrapper`; transfers).
    ``env``: the stage's job-wide variables (:attr:`StageTable.definition_env`); then the wrapper
    travels in the environment too (``CORRAL_WRAPPER``) and the command is :data:`BOOT_COMMAND`, so
    ECS's override of each task holds only the job's rows and a few names. Without ``env`` the
    command is the wrapper itself. ``consumable``: the job definition's
    ``consumableResourceProperties`` (a stage's ``max_parallel``, :mod:`caps`)."""
    if not stage.image:
        raise PlanError(
            f"stage {stage.name!r} has no image; AWS Batch runs every task in a container",
            "set `image:` on the stage or in `defaults:`",
        )
    res = stage.resources
    if fargate:
        _require_execution_role(ctx, f"stage {stage.name!r}")
        requirements = fargate_requirements(stage)
    else:
        from corral.routes import requirements_for

        requirements = requirements_for(res, fargate=False) or []  # (what the stage's route asks for)
    container: dict[str, Any] = {
        "image": image_uri(stage.image, ctx),
        "command": ["/bin/sh", "-c", WRAPPER],
        "resourceRequirements": requirements,
    }
    extra: dict[str, str] = {}
    if program is not None:
        extra["CORRAL_PROGRAM"] = program
    if stage.retries:
        extra["CORRAL_RETRIES"] = str(stage.retries)
        if stage.timeout:
            extra["CORRAL_TRY_TIMEOUT"] = str(max(1, math.ceil(stage.timeout)))
    if env is not None:
        container["command"] = list(BOOT_COMMAND)
        extra = {**env, **extra, WRAPPER_VAR: WRAPPER}
    if extra:
        container["environment"] = [{"name": k, "value": v} for k, v in sorted(extra.items())]
    if ctx.job_role_arn:
        container["jobRoleArn"] = ctx.job_role_arn
    if ctx.execution_role_arn:
        container["executionRoleArn"] = ctx.execution_role_arn
    if ctx.log_group:
        container["logConfiguration"] = {
            "logDriver": "awslogs",
            "options": {"awslogs-group": ctx.log_group, "awslogs-stream-prefix": "corral"},
        }
    if stage.secrets:
        container["secrets"] = [
            {"name": name, "valueFrom": _secret_arn(ref, ctx)} for name, ref in sorted(stage.secrets.items())
        ]
    if ctx.efs_id:
        efs: dict[str, Any] = {"fileSystemId": ctx.efs_id, "transitEncryption": "ENABLED"}
        if ctx.efs_access_point:
            efs["authorizationConfig"] = {"accessPointId": ctx.efs_access_point, "iam": "ENABLED"}
        container["volumes"] = [{"name": EFS_VOLUME, "efsVolumeConfiguration": efs}]
        container["mountPoints"] = [{"sourceVolume": EFS_VOLUME, "containerPath": EFS_MOUNT}]
    if res.shm:
        if fargate:
            raise PlanError(
                f"stage {stage.name!r} sets resources.shm, which Fargate does not support (linuxParameters."
                "sharedMemorySize is EC2 only)",
                "leave `fargate` out of aws.instance_types for it, or drop resources.shm",
            )
        # Batch API reference, LinuxParameters.sharedMemorySize: the size (MiB) of /dev/shm
        container["linuxParameters"] = {"sharedMemorySize": int(res.shm)}
    if fargate:
        container.update(fargate_properties(ctx, res.disk))
    content: dict[str, Any] = {
        "type": "container",
        "platformCapabilities": ["FARGATE" if fargate else "EC2"],
        "containerProperties": container,
        "retryStrategy": retry_strategy(stage.retries, fargate=fargate),
    }
    if consumable:
        # max_parallel (caps.py): the consumable resources each job (each array child) holds while it runs
        content["consumableResourceProperties"] = dict(consumable)
    if stage.timeout:
        # One try per attempt. With retries the wrapper stops the try at `timeout` itself (where the
        # image has `timeout`), so the try is retried like any failure; Batch's limit, a little
        # later, is the backstop (a job Batch stops for it is not retried).
        slack = 10 if stage.retries else 0
        content["timeout"] = {"attemptDurationSeconds": max(MIN_TIMEOUT, math.ceil(stage.timeout) + slack)}
    name = _content_name(content)
    kwargs = {
        "jobDefinitionName": name,
        **content,
        "tags": {**ctx.tags, "corral:managed": "true"},
        "propagateTags": True,
    }
    return JobDefinitionSpec(name=name, kwargs=kwargs)


def barrier_definition(image: str, ctx: JobContext, *, fargate: bool = False) -> JobDefinitionSpec:
    """A no-op job definition used to fan in more than 20 dependencies (on Fargate: the smallest
    Fargate size, for barriers in the Fargate queue)."""
    container: dict[str, Any] = {
        "image": image_uri(image, ctx),
        "command": BARRIER_COMMAND,
        "resourceRequirements": [{"type": "VCPU", "value": "1"}, {"type": "MEMORY", "value": "128"}],
        **({"executionRoleArn": ctx.execution_role_arn} if ctx.execution_role_arn else {}),
    }
    if fargate:
        _require_execution_role(ctx, "a barrier job")
        container["resourceRequirements"] = [{"type": "VCPU", "value": "0.25"}, {"type": "MEMORY", "value": "512"}]
        container.update(fargate_properties(ctx))
    content = {
        "type": "container",
        "platformCapabilities": ["FARGATE" if fargate else "EC2"],
        "containerProperties": container,
        "retryStrategy": {"attempts": 1},
    }
    name = _content_name(content)
    return JobDefinitionSpec(
        name=name, kwargs={"jobDefinitionName": name, **content, "tags": {**ctx.tags, "corral:managed": "true"}}
    )


# -- submission -----------------------------------------------------------------------------------
def submit_kwargs(
    *,
    job_name: str,
    job_queue: str,
    job_definition: str,
    size: int,
    table: str | None,
    env: Mapping[str, str],
    depends_on: Sequence[Mapping[str, str]] = (),
    tags: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """SubmitJob kwargs: a plain job when ``size`` is 1, else an array job of ``size`` children."""
    environment = [{"name": k, "value": v} for k, v in sorted(env.items())]
    if table is not None:
        environment.append({"name": TABLE_VAR, "value": table})
    kwargs: dict[str, Any] = {
        "jobName": job_name,
        "jobQueue": job_queue,
        "jobDefinition": job_definition,
        "containerOverrides": {"environment": environment},
    }
    if size > 1:
        kwargs["arrayProperties"] = {"size": size}
    if depends_on:
        kwargs["dependsOn"] = [dict(d) for d in depends_on]
    if tags:
        kwargs["tags"] = dict(tags)
        kwargs["propagateTags"] = True
    return kwargs


def payload_size(kwargs: Mapping[str, Any]) -> int:
    return len(json.dumps(kwargs, separators=(",", ":")).encode())


def env_size(env: Mapping[str, str]) -> int:
    return sum(len(json.dumps({"name": k, "value": v})) + 1 for k, v in env.items())


def overrides_length(command: Sequence[str], env: Mapping[str, str], requirements: Sequence[Any]) -> int:
    """Characters of the ECS container override of one task of a job (JSON framing included):
    the command, the environment and the resource requirements (see :data:`ECS_OVERRIDES_LIMIT`)."""
    override: dict[str, Any] = {"name": "default"}
    if command:
        override["command"] = list(command)
    if env:
        override["environment"] = [{"name": k, "value": v} for k, v in env.items()]
    if requirements:
        override["resourceRequirements"] = list(requirements)
    return len(json.dumps({"containerOverrides": [override]}, separators=(",", ":"), ensure_ascii=False))


def table_budget(spec: JobDefinitionSpec, env: Mapping[str, str]) -> int:
    """Characters the encoded item table of one job may take: what the ECS override limit leaves
    after the job definition's command and resources, the job's other variables (with room for
    ``CORRAL_INDEX_BASE``), Batch's own variables and a margin — and under SubmitJob's 30 KiB."""
    container = spec.kwargs.get("containerProperties", {})
    fixed = overrides_length(
        container.get("command", []), {**env, "CORRAL_INDEX_BASE": "99999", TABLE_VAR: ""},
        container.get("resourceRequirements", []),
    )
    if len(json.dumps(spec.kwargs, separators=(",", ":")).encode()) > JOB_DEFINITION_LIMIT:
        raise PlanError(
            f"the job definition of stage {spec.kwargs.get('jobDefinitionName')} would be over AWS Batch's 24 KiB",
            "keep the stage's env values and the item fields that are the same for every item short",
        )
    ecs = ECS_OVERRIDES_LIMIT - BATCH_VARIABLES_RESERVE - OVERRIDES_MARGIN - fixed
    submit = PAYLOAD_LIMIT - PAYLOAD_MARGIN - env_size(env)
    return min(ecs, submit)


def chunk_bounds(tables: Sequence[Sequence[str]], budget: int | Sequence[int]) -> list[int]:
    """Cut ``n`` aligned rows into chunks: sizes such that, for every table, the encoded rows of each
    chunk take at most its ``budget`` bytes (one for all, or one per table) and no chunk has more
    than 10,000 rows. All tables must have the same length; the same cut applies to all (so N_TO_N
    children stay aligned)."""
    if not tables:
        return []
    n = len(tables[0])
    assert all(len(t) == n for t in tables)
    budgets = [budget] * len(tables) if isinstance(budget, int) else list(budget)
    assert len(budgets) == len(tables)

    def fits(a: int, b: int) -> bool:
        return all(len(encode_table(t[a:b])) <= bb for t, bb in zip(tables, budgets, strict=True))

    sizes: list[int] = []
    a = 0
    guess = MAX_ARRAY_SIZE
    while a < n:
        hi = min(n, a + MAX_ARRAY_SIZE)
        if not fits(a, a + 1):
            raise PlanError(
                f"item {a} is too large to pass to AWS Batch (its row is over {min(budgets)} bytes compressed)",
                "keep item fields and env values short; put large data in files the command reads",
            )
        if fits(a, hi):
            b = hi
        else:
            # Largest b in (a, hi) that fits, starting from the previous chunk's size.
            lo = a + 1  # fits
            top = hi  # does not fit
            probe = min(top - 1, a + guess)
            if probe > lo:
                if fits(a, probe):
                    lo = probe
                else:
                    top = probe
            while top - lo > 1:
                mid = (lo + top) // 2
                if fits(a, mid):
                    lo = mid
                else:
                    top = mid
            b = lo
        sizes.append(b - a)
        guess = b - a
        a = b
    return sizes
