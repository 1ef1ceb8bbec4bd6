"""``max_parallel`` on AWS, enforced by Batch itself: one consumable resource per capped stage.

AWS Batch's resource-aware scheduling (Batch user guide, "Resource-aware scheduling", "Create
consumable resources", "Specify the resources needed to run a job") starts a job only when the
consumable resources its job definition names are available: a job holds its quantity from
STARTING until it is SUCCEEDED or FAILED, and waits in RUNNABLE meanwhile. So a capped stage of a
run gets a REPLENISHABLE resource ``corral-cap-<run>-<stage>`` of ``totalQuantity = max_parallel``,
and its job definition asks for 1 of it (``consumableResourceProperties``): at most ``max_parallel``
of the stage's tasks (array children included) run at once, whoever submitted them and whether or
not any client is still up. A resource costs nothing (Batch has no charge of its own); the account
may hold 50,000.

Resources are made before the run's jobs are submitted (found, or made, or set to the cap again:
idempotent, so resume makes nothing new) and removed with ``corral aws teardown --run`` /
``--all`` (:func:`remove`), except while jobs hold them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from corral.backends.aws_batch.client import aws_errors, error_code
from corral.backends.aws_batch.common import RUN_TAG, is_managed
from corral.plan import Plan

PREFIX = "corral-cap-"
REPLENISHABLE = "REPLENISHABLE"  # (the API's default) a job gives its quantity back when it ends
NAME_LIMIT = 128  # kept short of any limit: the API reference states none (see the README)


def _safe(text: str, limit: int) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]", "-", text)
    if len(s) <= limit:
        return s
    return s[: limit - 13] + "-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def resource_name(run_id: str, stage: str) -> str:
    """``corral-cap-<run>-<stage>`` (letters, digits, ``-`` and ``_``; at most 128 characters)."""
    return f"{PREFIX}{_safe(run_id, 60)}-{_safe(stage, NAME_LIMIT - len(PREFIX) - 61)}"


def run_prefix(run_id: str) -> str:
    return f"{PREFIX}{_safe(run_id, 60)}-"


def capped_stages(plan: Plan) -> dict[str, int]:
    """Stage name → its ``max_parallel``, for the stages where the cap can bind (more tasks than it)."""
    out: dict[str, int] = {}
    for s in plan.workflow.stages:
        cap = s.max_parallel
        if cap is not None and len(plan.stage_tasks(s.name)) > cap:
            out[s.name] = int(cap)
    return out


def requirement(name: str) -> dict[str, Any]:
    """What a capped stage's job definition adds: 1 of the stage's resource for each job (each
    array child) while it runs."""
    return {"consumableResourceList": [{"consumableResource": name, "quantity": 1}]}


def _find(batch: Any, name: str) -> dict[str, Any] | None:
    # ListConsumableResources filters by name (case-insensitive; a trailing * matches a prefix):
    # no guessing at the error code DescribeConsumableResource gives for a missing one.
    for page in _pages(batch, [name]):
        for r in page:
            if r.get("consumableResourceName") == name:
                return r
    return None


def _pages(batch: Any, values: list[str]) -> Any:
    token = None
    while True:
        kw: dict[str, Any] = {"filters": [{"name": "CONSUMABLE_RESOURCE_NAME", "values": values}]}
        if token:
            kw["nextToken"] = token
        resp = batch.list_consumable_resources(**kw)
        yield resp.get("consumableResources", [])
        token = resp.get("nextToken")
        if not token:
            return


def ensure(batch: Any, plan: Plan, run_id: str, tags: Mapping[str, str] | None = None,
           say: Any = None) -> dict[str, str]:
    """Stage name → the run's consumable resource for it, each found or made with the stage's
    cap as its total (a total that differs is set back to the cap)."""
    caps = capped_stages(plan)
    out: dict[str, str] = {}
    for stage, cap in caps.items():
        name = resource_name(run_id, stage)
        with aws_errors(f"make the consumable resource {name} that caps stage {stage!r} at {cap} (max_parallel)"):
            found = _find(batch, name)
            if found is None:
                batch.create_consumable_resource(
                    consumableResourceName=name, totalQuantity=cap, resourceType=REPLENISHABLE,
                    tags={**dict(tags or {}), "corral:managed": "true", RUN_TAG: run_id},
                )
                if say is not None:
                    say(f"corral: stage {stage!r} runs at most {cap} at once (Batch consumable resource {name})")
            elif int(found.get("totalQuantity") or 0) != cap:
                batch.update_consumable_resource(consumableResource=name, operation="SET", quantity=cap)
        out[stage] = name
    return out


def remove(batch: Any, run_id: str | None) -> tuple[list[str], list[str]]:
    """Delete corral's consumable resources: the run's (``run_id``), or all of corral's (None).
    One that jobs still hold (``inUseQuantity`` > 0) is kept. Returns (deleted, kept with why)."""
    prefix = run_prefix(run_id) if run_id else PREFIX
    deleted: list[str] = []
    kept: list[str] = []
    with aws_errors("remove corral's consumable resources (max_parallel caps)"):
        try:
            pages = list(_pages(batch, [prefix + "*"]))
        except Exception as exc:
            if error_code(exc) == "404":  # an endpoint without the API (an emulator; a partition without it)
                return deleted, kept
            raise
        for page in pages:
            for r in page:
                name = str(r.get("consumableResourceName", ""))
                if not name.startswith(prefix):
                    continue  # (the filter is case-insensitive)
                detail = batch.describe_consumable_resource(consumableResource=name)
                if not is_managed(detail.get("tags"), run_id):
                    continue
                if int(detail.get("inUseQuantity") or r.get("inUseQuantity") or 0) > 0:
                    kept.append(f"{name} (jobs of the run still hold it: cancel the run or wait, then again)")
                    continue
                batch.delete_consumable_resource(consumableResource=name)
                deleted.append(name)
    return deleted, kept
