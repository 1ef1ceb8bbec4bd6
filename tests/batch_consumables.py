"""AWS Batch consumable resources (resource-aware scheduling), which moto 5.2 does not have.

moto's server answers ``/v1/*consumableresource*`` with a 404 page. The strict-AWS layer
(``strict_aws.py``) answers those calls from here instead, on every client it hooks, before
anything is sent (botocore's ``before-call`` event, the way botocore's own Stubber answers):
Create/Describe/List/Update/Delete as the Batch API reference describes them, with the checks
AWS documents (a unique name per account and Region, ``totalQuantity`` non-negative, the
resource types, 50,000 per account, SET/ADD/REMOVE). ``in_use`` is what the contract suite's
simulated Batch (``contract/batch_sim.py``) takes and gives back as children start and end.

Clients the layer never sees (``corral`` run in a subprocess) still get moto's 404.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError

OPERATIONS = {"CreateConsumableResource", "DescribeConsumableResource", "ListConsumableResources",
              "UpdateConsumableResource", "DeleteConsumableResource"}
# Batch user guide, "Create consumable resources": "The maximum number of consumable resources per
# account is 50k."
MAX_RESOURCES = 50_000
RESOURCE_TYPES = {"REPLENISHABLE", "NON_REPLENISHABLE"}  # API reference, CreateConsumableResource


@dataclass
class Resource:
    name: str
    arn: str
    total: int
    kind: str
    tags: dict[str, str] = field(default_factory=dict)
    in_use: int = 0
    created: int = 0


def _error(operation: str, message: str) -> ClientError:
    return ClientError({"Error": {"Code": "ClientException", "Message": message},
                        "ResponseMetadata": {"HTTPStatusCode": 400}}, operation)


class ConsumableResources:
    """The account's consumable resources (one per test: the layer's)."""

    def __init__(self, region: str = "us-east-2", account: str = "123456789012") -> None:
        self.region = region
        self.account = account
        self.resources: dict[str, Resource] = {}
        self.calls: list[str] = []
        self._lock = threading.Lock()

    # -- for the simulated Batch ---------------------------------------------------------------
    def get(self, ref: str) -> Resource | None:
        name = ref.rsplit("/", 1)[-1] if ref.startswith("arn:") else ref
        return self.resources.get(name)

    def take(self, ref: str, quantity: int) -> bool:
        with self._lock:
            r = self.get(ref)
            if r is None or r.total - r.in_use < quantity:
                return False
            r.in_use += quantity
            return True

    def give_back(self, ref: str, quantity: int) -> None:
        with self._lock:
            r = self.get(ref)
            if r is not None and r.kind == "REPLENISHABLE":
                r.in_use -= quantity

    # -- the API -------------------------------------------------------------------------------
    def answer(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.calls.append(operation)
            return getattr(self, "_" + operation)(params)

    def _CreateConsumableResource(self, p: dict[str, Any]) -> dict[str, Any]:
        op = "CreateConsumableResource"
        name = p["consumableResourceName"]
        if name in self.resources:  # user guide: "must be unique at the account level"
            raise _error(op, f"Consumable resource {name} already exists")
        if len(self.resources) >= MAX_RESOURCES:
            raise _error(op, f"an account holds at most {MAX_RESOURCES} consumable resources")
        total = int(p.get("totalQuantity", 0))
        if total < 0:  # API reference: "Must be non-negative."
            raise _error(op, f"totalQuantity must be non-negative, got {total}")
        kind = p.get("resourceType", "REPLENISHABLE")
        if kind not in RESOURCE_TYPES:
            raise _error(op, f"resourceType must be REPLENISHABLE or NON_REPLENISHABLE, got {kind}")
        arn = f"arn:aws:batch:{self.region}:{self.account}:consumable-resource/{name}"
        self.resources[name] = Resource(name, arn, total, kind, dict(p.get("tags") or {}),
                                        created=int(time.time() * 1000))
        return {"consumableResourceName": name, "consumableResourceArn": arn}

    def _lookup(self, op: str, ref: str) -> Resource:
        r = self.get(ref)
        if r is None:
            raise _error(op, f"Consumable resource {ref} not found")
        return r

    def _DescribeConsumableResource(self, p: dict[str, Any]) -> dict[str, Any]:
        r = self._lookup("DescribeConsumableResource", p["consumableResource"])
        return {"consumableResourceName": r.name, "consumableResourceArn": r.arn, "totalQuantity": r.total,
                "inUseQuantity": r.in_use, "availableQuantity": r.total - r.in_use, "resourceType": r.kind,
                "createdAt": r.created, "tags": dict(r.tags)}

    def _ListConsumableResources(self, p: dict[str, Any]) -> dict[str, Any]:
        values = [v for f in p.get("filters") or [] if f.get("name") == "CONSUMABLE_RESOURCE_NAME"
                  for v in f.get("values") or []]

        def match(name: str) -> bool:  # API reference: case-insensitive; a trailing * is a prefix
            low = name.lower()
            return not values or any(
                low.startswith(v[:-1].lower()) if v.endswith("*") else low == v.lower() for v in values)

        found = sorted((r for r in self.resources.values() if match(r.name)), key=lambda r: r.name)
        start = int(p.get("nextToken") or 0)
        size = int(p.get("maxResults") or 100)
        page = found[start : start + size]
        out: dict[str, Any] = {"consumableResources": [
            {"consumableResourceArn": r.arn, "consumableResourceName": r.name, "totalQuantity": r.total,
             "inUseQuantity": r.in_use, "resourceType": r.kind} for r in page]}
        if start + size < len(found):
            out["nextToken"] = str(start + size)
        return out

    def _UpdateConsumableResource(self, p: dict[str, Any]) -> dict[str, Any]:
        op = "UpdateConsumableResource"
        r = self._lookup(op, p["consumableResource"])
        how, q = p.get("operation", "SET"), int(p.get("quantity", 0))
        if how not in ("SET", "ADD", "REMOVE"):  # API reference: "Must be one of: SET, ADD, REMOVE"
            raise _error(op, f"operation must be SET, ADD or REMOVE, got {how}")
        total = q if how == "SET" else r.total + q if how == "ADD" else r.total - q
        if total < 0:
            raise _error(op, f"totalQuantity would be {total}")
        r.total = total
        return {"consumableResourceName": r.name, "consumableResourceArn": r.arn, "totalQuantity": r.total}

    def _DeleteConsumableResource(self, p: dict[str, Any]) -> dict[str, Any]:
        r = self._lookup("DeleteConsumableResource", p["consumableResource"])
        del self.resources[r.name]
        return {}

    # -- the botocore hook ---------------------------------------------------------------------
    def before_call(self, model: Any, params: Any, context: dict[str, Any] | None = None,
                    **_: Any) -> tuple[AWSResponse, dict[str, Any]] | None:
        if model.name not in OPERATIONS:
            return None
        api_params = (context or {}).get("strict_params") or {}
        parsed = self.answer(model.name, dict(api_params))
        parsed.setdefault("ResponseMetadata", {"HTTPStatusCode": 200})
        return AWSResponse("https://batch.invalid/", 200, {}, None), parsed
