"""Shared pieces of provisioning: the context passed around, tags in each service's shape, names."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.waiting import DEFAULT as DEFAULT_POLLER
from corral.backends.aws_batch.waiting import Poller

MANAGED_TAG = "corral:managed"
RUN_TAG = "corral:run"
NAME = "corral"
IAM_PATH = "/corral/"


def content_hash(obj: Any, n: int = 10) -> str:
    """A short, stable hash of JSON-able content: names resources so equal content is reused."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def tag_dict(tags: list[dict[str, str]] | dict[str, str] | None) -> dict[str, str]:
    if not tags:
        return {}
    if isinstance(tags, dict):
        return dict(tags)
    return {t.get("Key", t.get("key", "")): t.get("Value", t.get("value", "")) for t in tags}


def is_managed(tags: list[dict[str, str]] | dict[str, str] | None, run_id: str | None = None) -> bool:
    d = tag_dict(tags)
    if d.get(MANAGED_TAG) != "true":
        return False
    return run_id is None or d.get(RUN_TAG) == run_id


@dataclass
class Ctx:
    """What every ensure_* step needs: clients, where to report, the tags, how to wait."""

    clients: AwsClients
    report: Any  # ProvisionReport (kept loose to avoid an import cycle)
    tags: dict[str, str]
    poller: Poller = field(default_factory=lambda: DEFAULT_POLLER)
    _account: str | None = None
    memo: dict[str, Any] = field(default_factory=dict)  # answers found once per call (e.g. the service role)

    @property
    def region(self) -> str:
        return self.clients.region

    @property
    def account(self) -> str:
        if self._account is None:
            self._account = self.clients.account_id()
        return self._account

    @property
    def partition(self) -> str:
        return self.clients.partition()

    def arn(self, service: str, resource: str, *, region: bool = True, account: bool = True) -> str:
        return (f"arn:{self.partition}:{service}:{self.region if region else ''}:"
                f"{self.account if account else ''}:{resource}")

    def created(self, kind: str, name: str) -> None:
        self.report.created.append(f"{kind} {name}")

    def found(self, kind: str, name: str) -> None:
        self.report.found.append(f"{kind} {name}")

    def updated(self, kind: str, name: str) -> None:
        self.report.updated.append(f"{kind} {name}")

    def with_run(self, run_id: str | None) -> dict[str, str]:
        return {**self.tags, RUN_TAG: run_id} if run_id else dict(self.tags)
