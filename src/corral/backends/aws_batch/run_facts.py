"""A run's AWS facts, typed: where the run lives on AWS Batch, as recorded in its run record.

The stored form is unchanged — a JSON object under ``run.options["aws_batch"]`` (:data:`OPTIONS_KEY`),
in the SQLite and DynamoDB stores alike — so runs recorded before this module existed read as
they always did, and keys this version does not know (written by a newer corral) are kept and
written back as they were. :class:`RunFacts` is the one reader and writer of that object:
``RunFacts.of(run)`` reads it, ``facts.replace(...).save_to(run)`` writes it (in place: code that
still holds the dict sees the change). A fact never recorded is ``None``. A feature that records
a fact of its own before it has a field here uses ``facts.get("name")`` and
``facts.replace(name=value)`` (kept in :attr:`RunFacts.other`, stored under its name), or, to
update it in place, :meth:`RunFacts.stored`; nothing else touches ``run.options["aws_batch"]``
(``tests/unit/test_architecture.py`` checks).

What is recorded, and who reads it:

- ``job_queue``, ``gpu_job_queue``, ``fargate_job_queue`` (ARNs): where the run's jobs go and are
  looked for (resume, cancel, status, the cleanup after a failure, doctor, the data removal);
- ``region``, ``log_group``, ``table``: where its logs and records are;
- ``cleanup_stages``: its cleanup stages (older runs: the ``cleanup: true`` stage);
- ``efs_id``, ``efs_access_point``, ``job_role_arn``, ``execution_role_arn``, ``assign_public_ip``:
  its EFS workspace and the roles that mount it (``corral aws teardown --run``);
- ``round``, ``round0_chunks``: the last submission round and the first round's chunk sizes (which
  name every task's job and child);
- ``staged``: the ``s3://`` root its local inputs were staged under.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from corral.model import RunRecord

OPTIONS_KEY = "aws_batch"


@dataclass(frozen=True)
class RunFacts:
    """The typed view of ``run.options["aws_batch"]`` (see the module docstring)."""

    job_queue: str | None = None
    gpu_job_queue: str | None = None
    fargate_job_queue: str | None = None
    region: str | None = None
    log_group: str | None = None
    table: str | None = None
    cleanup_stages: tuple[str, ...] | None = None
    efs_id: str | None = None
    efs_access_point: str | None = None
    job_role_arn: str | None = None
    execution_role_arn: str | None = None
    assign_public_ip: bool | None = None
    round: int | None = None
    round0_chunks: tuple[int, ...] | None = None
    staged: str | None = None
    other: Mapping[str, Any] = field(default_factory=dict)  # keys this version does not know, as stored
    # the facts recorded (a recorded null included: it is written back as null)
    present: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    # -- the stored form ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, stored: Mapping[str, Any] | None) -> RunFacts:
        """Read the stored object (absent keys → None; unknown keys kept in :attr:`other`)."""
        stored = dict(stored or {})
        known = {f.name for f in dataclasses.fields(cls)} - {"other", "present"}
        kw: dict[str, Any] = {k: stored[k] for k in known if k in stored}
        if kw.get("cleanup_stages") is not None:
            kw["cleanup_stages"] = tuple(str(s) for s in kw["cleanup_stages"])
        if kw.get("round0_chunks") is not None:
            kw["round0_chunks"] = tuple(int(n) for n in kw["round0_chunks"])
        if kw.get("round") is not None:
            kw["round"] = int(kw["round"])
        return cls(**kw, other={k: v for k, v in stored.items() if k not in known}, present=frozenset(kw))

    def to_dict(self) -> dict[str, Any]:
        """The stored object: the facts recorded or set (a fact never recorded is left out), then the
        unknown keys."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("other", "present"):
                continue
            value = getattr(self, f.name)
            if value is None and f.name not in self.present:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return {**out, **{k: v for k, v in self.other.items() if k not in out}}

    @classmethod
    def of(cls, run: RunRecord) -> RunFacts:
        return cls.from_dict(run.options.get(OPTIONS_KEY))

    @staticmethod
    def stored(run: RunRecord) -> dict[str, Any]:
        """The stored object itself (made empty when missing), for a feature that keeps facts of its
        own in it and updates them in place; the typed facts are read with :meth:`of`."""
        stored: dict[str, Any] = run.options.setdefault(OPTIONS_KEY, {})
        return stored

    def save_to(self, run: RunRecord) -> RunFacts:
        """Write into ``run.options`` (in place; the caller saves the run record)."""
        stored = run.options.setdefault(OPTIONS_KEY, {})
        stored.update(self.to_dict())
        return self

    def replace(self, **changes: Any) -> RunFacts:
        """These facts with ``changes`` set (and so written, None included). A key that is not one
        of the fields above goes to :attr:`other`, as stored (a fact a feature records for itself)."""
        known = {f.name for f in dataclasses.fields(self)} - {"other", "present"}
        typed = {k: v for k, v in changes.items() if k in known}
        extra = {k: v for k, v in changes.items() if k not in known}
        other = {**self.other, **extra} if extra else self.other
        return dataclasses.replace(self, **typed, other=other, present=self.present | frozenset(typed))

    def get(self, key: str, default: Any = None) -> Any:
        """A fact by its stored name: a field's value, else a key of :attr:`other`."""
        if key in {f.name for f in dataclasses.fields(self)} - {"other", "present"}:
            value = getattr(self, key)
            return default if value is None else value
        return self.other.get(key, default)

    def with_defaults(self, **defaults: Any) -> RunFacts:
        """These facts, with each of ``defaults`` filled in where nothing is recorded (a resume
        keeps the run's first answers)."""
        return self.replace(**{k: v for k, v in defaults.items() if k not in self.present and getattr(self, k) is None})

    # -- what readers ask ---------------------------------------------------------------------
    @property
    def submitted(self) -> bool:
        """The run has a queue recorded (it was submitted, at least in part)."""
        return bool(self.job_queue)

    def queues(self) -> tuple[str, str | None, str | None]:
        """(default, GPU, Fargate) queue ARNs, as ``submit.Queues`` takes them."""
        return self.job_queue or "", self.gpu_job_queue or None, self.fargate_job_queue or None

    def queue_names(self) -> list[str]:
        """The names (not ARNs) of the queues recorded."""
        return [q.rsplit("/", 1)[-1] for q in (self.job_queue, self.gpu_job_queue, self.fargate_job_queue) if q]
