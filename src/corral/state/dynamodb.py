"""DynamoDB state store: the same protocol as the SQLite store, readable from any machine.

One table (on-demand billing) with a partition key ``pk`` (S) and a sort key ``sk`` (S)::

    pk = "RUN#<run_id>"  sk = "RUN"                  the run record (JSON in ``d``), ``chunks`` = manifest parts
    pk = "RUN#<run_id>"  sk = "MANIFEST#<nnnn>"      the manifest, gzip-compressed, cut in parts < 400 KB
    pk = "RUN#<run_id>"  sk = "TASK#<task_id>"       one task (JSON in ``d``, its plan order in ``ord``)
    pk = "RUN#<run_id>"  sk = "ATT#<task_id>#<nnnn>" one attempt
    pk = "RUNS"          sk = "<created_at>#<run_id>"  the index ``list_runs`` reads newest first

Task writes go through BatchWriteItem (25 items a call) with UnprocessedItems retried with bounded
backoff; botocore's adaptive retry mode absorbs throttling of each call. Reads are strongly
consistent, so a ``status`` right after a write sees it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from corral.errors import StateError
from corral.model import AttemptRecord, RunRecord, RunState, TaskRecord, TaskState, now

MANIFEST_PART = 350_000  # bytes per item (DynamoDB's limit is 400 KB per item, names included)
BATCH_WRITE = 25
WRITERS = 8  # BatchWriteItem calls in flight at once (boto3 clients are thread-safe)
BATCH_GET = 100
MAX_UNPROCESSED_ROUNDS = 12


def _s(v: str) -> dict[str, str]:
    return {"S": v}


def _n(v: float | int) -> dict[str, str]:
    return {"N": repr(v) if isinstance(v, float) else str(v)}


class DynamoStore:
    """State in a DynamoDB table; ``client`` is a boto3 DynamoDB client (``AwsClients.dynamodb``)."""

    def __init__(
        self,
        table_name: str,
        client: Any,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.table = table_name
        self.client = client
        self._sleep = sleep
        self._order: dict[str, dict[str, int]] = {}  # run_id -> task_id -> plan order

    # -- setup --------------------------------------------------------------------------------
    def create_table_if_missing(self, tags: dict[str, str] | None = None) -> bool:
        """Create the table (on-demand) unless it exists; wait until ACTIVE. True if created.

        Provisioning creates the table too; this is for tests and first use."""
        client = self.client
        try:
            client.describe_table(TableName=self.table)
            return False
        except client.exceptions.ResourceNotFoundException:
            pass
        resp = client.create_table(
            TableName=self.table,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
            Tags=[{"Key": k, "Value": v} for k, v in (tags or {"corral:managed": "true"}).items()],
        )
        if resp.get("TableDescription", {}).get("TableStatus") != "ACTIVE":
            client.get_waiter("table_exists").wait(
                TableName=self.table, WaiterConfig={"Delay": 2, "MaxAttempts": 90}
            )
        return True

    # -- runs ---------------------------------------------------------------------------------
    def create_run(self, run: RunRecord, manifest: bytes, tasks: Sequence[TaskRecord]) -> None:
        pk = _run_pk(run.run_id)
        blob = gzip.compress(manifest, mtime=0)
        parts = [blob[i : i + MANIFEST_PART] for i in range(0, len(blob), MANIFEST_PART)] or [b""]
        run = run.replace(updated_at=run.updated_at or run.created_at)
        with self._errors(f"record run {run.run_id}"):
            try:
                self._put_run_head(run, len(parts))
            except self.client.exceptions.ResourceNotFoundException:
                # First run in this account/region: make the table (provisioning would find it).
                self.create_table_if_missing()
                self._put_run_head(run, len(parts))
            items: list[dict[str, Any]] = [
                {"pk": _s(pk), "sk": _s(f"MANIFEST#{i:04d}"), "b": {"B": part}} for i, part in enumerate(parts)
            ]
            order = self._order.setdefault(run.run_id, {})
            for i, t in enumerate(tasks):
                order[t.task_id] = i
                items.append(_task_item(t, i))
            items.append(
                {"pk": _s("RUNS"), "sk": _s(f"{run.created_at:020.6f}#{run.run_id}"), "run_id": _s(run.run_id)}
            )
            self._batch_put(items)

    def _put_run_head(self, run: RunRecord, parts: int) -> None:
        try:
            self.client.put_item(
                TableName=self.table,
                Item={"pk": _s(_run_pk(run.run_id)), "sk": _s("RUN"), "d": _s(_run_json(run)), "chunks": _n(parts)},
                ConditionExpression="attribute_not_exists(pk)",
            )
        except self.client.exceptions.ConditionalCheckFailedException:
            raise StateError(f"run {run.run_id} exists already", "use `corral resume` to go on with it") from None

    def get_run(self, run_id: str) -> RunRecord:
        with self._errors(f"read run {run_id}"):
            resp = self.client.get_item(
                TableName=self.table, Key={"pk": _s(_run_pk(run_id)), "sk": _s("RUN")}, ConsistentRead=True
            )
        item = resp.get("Item")
        if item is None:
            raise StateError(f"no run {run_id!r} in table {self.table}", "`corral status --all` lists the runs")
        return _run_from_json(item["d"]["S"])

    def list_runs(self, limit: int = 20) -> list[RunRecord]:
        ids: list[str] = []
        with self._errors("list runs"):
            kwargs: dict[str, Any] = {
                "TableName": self.table,
                "KeyConditionExpression": "pk = :p",
                "ExpressionAttributeValues": {":p": _s("RUNS")},
                "ScanIndexForward": False,
                "ConsistentRead": True,
            }
            while len(ids) < limit:
                resp = self.client.query(Limit=limit - len(ids), **kwargs)
                ids += [it["run_id"]["S"] for it in resp.get("Items", [])]
                if "LastEvaluatedKey" not in resp:
                    break
                kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]
            runs: dict[str, RunRecord] = {}
            keys = [{"pk": _s(_run_pk(r)), "sk": _s("RUN")} for r in ids]
            for item in self._batch_get(keys):
                rec = _run_from_json(item["d"]["S"])
                runs[rec.run_id] = rec
        out = [runs[r] for r in ids if r in runs]
        out.sort(key=lambda r: (r.created_at, r.run_id), reverse=True)
        return out

    def save_run(self, run: RunRecord) -> None:
        run = run.replace(updated_at=now())
        with self._errors(f"update run {run.run_id}"):
            try:
                self.client.update_item(
                    TableName=self.table,
                    Key={"pk": _s(_run_pk(run.run_id)), "sk": _s("RUN")},
                    UpdateExpression="SET d = :d",
                    ConditionExpression="attribute_exists(pk)",
                    ExpressionAttributeValues={":d": _s(_run_json(run))},
                )
            except self.client.exceptions.ConditionalCheckFailedException:
                raise StateError(f"no run {run.run_id!r} to update", "create the run first") from None

    def load_manifest(self, run_id: str) -> bytes:
        with self._errors(f"read the manifest of run {run_id}"):
            head = self.client.get_item(
                TableName=self.table, Key={"pk": _s(_run_pk(run_id)), "sk": _s("RUN")}, ConsistentRead=True
            ).get("Item")
            if head is None:
                raise StateError(f"no run {run_id!r} in table {self.table}", "`corral status --all` lists the runs")
            n = int(head["chunks"]["N"])
            parts = list(self._query(run_id, "MANIFEST#"))
        if len(parts) != n:
            raise StateError(
                f"the manifest of run {run_id} is incomplete ({len(parts)} of {n} parts)",
                "the run was not fully recorded; start it again",
            )
        return gzip.decompress(b"".join(bytes(p["b"]["B"]) for p in parts))

    # -- tasks --------------------------------------------------------------------------------
    def get_tasks(self, run_id: str, states: Iterable[TaskState] | None = None) -> list[TaskRecord]:
        wanted = None if states is None else {TaskState(s) for s in states}
        rows: list[tuple[int, TaskRecord]] = []
        order: dict[str, int] = {}
        with self._errors(f"read the tasks of run {run_id}"):
            for item in self._query(run_id, "TASK#"):
                t = _task_from_json(item["d"]["S"])
                ordinal = int(item["ord"]["N"])
                order[t.task_id] = ordinal
                if wanted is None or t.state in wanted:
                    rows.append((ordinal, t))
        self._order[run_id] = order
        rows.sort(key=lambda r: r[0])
        return [t for _, t in rows]

    def save_tasks(self, tasks: Sequence[TaskRecord]) -> None:
        """Upsert whole task records of existing runs (unknown task ids are ignored, like SQLite)."""
        if not tasks:
            return
        items = []
        for t in tasks:
            order = self._order.get(t.run_id)
            if order is None or t.task_id not in order:
                self.get_tasks(t.run_id)
                order = self._order.get(t.run_id, {})
            if t.task_id in order:
                items.append(_task_item(t, order[t.task_id]))
        with self._errors("save task states"):
            self._batch_put(items)

    def swap_task(self, old: TaskRecord, new: TaskRecord) -> bool:
        """A conditional PutItem: written only while the stored record is still ``old``."""
        order = self._order.get(old.run_id)
        if order is None or old.task_id not in order:
            self.get_tasks(old.run_id)
            order = self._order.get(old.run_id, {})
        if old.task_id not in order:
            return False
        ordinal = order[old.task_id]
        with self._errors(f"update task {old.task_id}"):
            try:
                self.client.put_item(
                    TableName=self.table, Item=_task_item(new, ordinal), ConditionExpression="d = :old",
                    ExpressionAttributeValues={":old": _task_item(old, ordinal)["d"]},
                )
            except self.client.exceptions.ConditionalCheckFailedException:
                return False
        return True

    # -- attempts -----------------------------------------------------------------------------
    def save_attempt(self, attempt: AttemptRecord) -> None:
        with self._errors(f"save attempt {attempt.attempt} of task {attempt.task_id}"):
            self.client.put_item(
                TableName=self.table,
                Item={
                    "pk": _s(_run_pk(attempt.run_id)),
                    "sk": _s(f"ATT#{attempt.task_id}#{attempt.attempt:04d}"),
                    "d": _s(json.dumps(_attempt_dict(attempt), sort_keys=True)),
                },
            )

    def get_attempts(self, run_id: str, task_id: str) -> list[AttemptRecord]:
        with self._errors(f"read the attempts of task {task_id}"):
            items = list(self._query(run_id, f"ATT#{task_id}#"))
        return [_attempt_from_dict(json.loads(it["d"]["S"])) for it in items]

    def close(self) -> None:
        pass

    # -- helpers ------------------------------------------------------------------------------
    def _query(self, run_id: str, prefix: str) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "TableName": self.table,
            "KeyConditionExpression": "pk = :p AND begins_with(sk, :s)",
            "ExpressionAttributeValues": {":p": _s(_run_pk(run_id)), ":s": _s(prefix)},
            "ConsistentRead": True,
        }
        while True:
            resp = self.client.query(**kwargs)
            yield from resp.get("Items", [])
            if "LastEvaluatedKey" not in resp:
                return
            kwargs["ExclusiveStartKey"] = resp["LastEvaluatedKey"]

    def _backoff(self, round_: int) -> None:
        self._sleep(min(2.0, 0.05 * 2**round_) * (0.5 + random.random() / 2))

    def _batch_put(self, items: list[dict[str, Any]]) -> None:
        """BatchWriteItem in chunks of 25, up to WRITERS chunks at once (each chunk retries its own
        unprocessed items with backoff); returns when every item is written. An item given twice
        is written once, with its last value, so parallel chunks cannot reorder two versions."""
        last = {(it["pk"]["S"], it["sk"]["S"]): it for it in items}
        unique = list(last.values())
        chunks = [unique[i : i + BATCH_WRITE] for i in range(0, len(unique), BATCH_WRITE)]
        if len(chunks) <= 1:
            for chunk in chunks:
                self._put_chunk(chunk)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(WRITERS, len(chunks))) as pool:
            for future in [pool.submit(self._put_chunk, chunk) for chunk in chunks]:
                future.result()  # the first error is raised (the others still finish)

    def _put_chunk(self, chunk: list[dict[str, Any]]) -> None:
        pending: list[dict[str, Any]] = [{"PutRequest": {"Item": it}} for it in chunk]
        for round_ in range(MAX_UNPROCESSED_ROUNDS + 1):
            resp = self.client.batch_write_item(RequestItems={self.table: pending})
            pending = resp.get("UnprocessedItems", {}).get(self.table, [])
            if not pending:
                return
            if round_ == MAX_UNPROCESSED_ROUNDS:
                raise StateError(
                    f"DynamoDB table {self.table} kept {len(pending)} writes unprocessed",
                    "the table is throttled; try again in a minute",
                )
            self._backoff(round_)

    def _batch_get(self, keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i in range(0, len(keys), BATCH_GET):
            pending: dict[str, Any] = {"Keys": keys[i : i + BATCH_GET], "ConsistentRead": True}
            for round_ in range(MAX_UNPROCESSED_ROUNDS + 1):
                resp = self.client.batch_get_item(RequestItems={self.table: pending})
                out += resp.get("Responses", {}).get(self.table, [])
                pending = resp.get("UnprocessedKeys", {}).get(self.table) or {}
                if not pending.get("Keys"):
                    break
                if round_ == MAX_UNPROCESSED_ROUNDS:
                    raise StateError(
                        f"DynamoDB table {self.table} kept {len(pending['Keys'])} reads unprocessed",
                        "the table is throttled; try again in a minute",
                    )
                self._backoff(round_)
        return out

    def _errors(self, action: str) -> Any:
        return _StoreErrors(self.table, action)


class _StoreErrors:
    """Turn botocore errors into StateError naming the table (credentials errors stay credentials errors)."""

    def __init__(self, table: str, action: str) -> None:
        self.table = table
        self.action = action

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, StateError):
            return
        try:
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:  # pragma: no cover
            return
        if not isinstance(exc, (ClientError, BotoCoreError)):
            return
        from corral.backends.aws_batch.client import translate
        from corral.errors import CredentialsError

        err = translate(exc, f"{self.action} in DynamoDB table {self.table}")
        if isinstance(err, CredentialsError):
            raise err from exc
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "") if hasattr(exc, "response") else ""
        if code == "ResourceNotFoundException":
            raise StateError(
                f"DynamoDB table {self.table} does not exist (while trying to {self.action})",
                "run `corral aws setup` (it creates the state table) or check the region",
            ) from exc
        raise StateError(
            f"could not {self.action} in DynamoDB table {self.table}: {err.message if err else exc}",
            "check the table and your permissions; rerun with --debug for details",
        ) from exc


def _run_pk(run_id: str) -> str:
    return f"RUN#{run_id}"


def _run_json(r: RunRecord) -> str:
    d = dataclasses.asdict(r)
    d["state"] = r.state.value
    return json.dumps(d, sort_keys=True)


def _run_from_json(text: str) -> RunRecord:
    d = json.loads(text)
    d["state"] = RunState(d["state"])
    return RunRecord(**d)


_TASK_FIELDS = [f.name for f in dataclasses.fields(TaskRecord)]


def _task_item(t: TaskRecord, ordinal: int) -> dict[str, Any]:
    d = {f: getattr(t, f) for f in _TASK_FIELDS}
    d["state"] = t.state.value
    return {
        "pk": _s(_run_pk(t.run_id)),
        "sk": _s(f"TASK#{t.task_id}"),
        "ord": _n(ordinal),
        "d": _s(json.dumps(d, sort_keys=True, separators=(",", ":"))),
    }


def _task_from_json(text: str) -> TaskRecord:
    d = json.loads(text)
    d["state"] = TaskState(d["state"])
    return TaskRecord(**d)


def _attempt_dict(a: AttemptRecord) -> dict[str, Any]:
    d = dataclasses.asdict(a)
    d["state"] = a.state.value
    return d


def _attempt_from_dict(d: dict[str, Any]) -> AttemptRecord:
    d = dict(d)
    d["state"] = TaskState(d["state"])
    return AttemptRecord(**d)
