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

import contextlib
import dataclasses
import gzip
import json
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from corral.errors import StateError
from corral.model import AttemptRecord, RunRecord, RunState, TaskRecord, TaskState, now
from corral.state.lease import LEASE_WAIT_S, Holder, LeaseHeld

MANIFEST_PART = 350_000  # bytes per item (DynamoDB's limit is 400 KB per item, names included)
BATCH_WRITE = 25
WRITERS = 8  # BatchWriteItem calls in flight at once (boto3 clients are thread-safe)
BATCH_GET = 100
MAX_UNPROCESSED_ROUNDS = 12
PAGE_TASKS = 250  # task records per page item (compressed: ~10-30 KB; the item limit is 400 KB)
MAX_REASON = 2000  # characters of a task's reason kept in a page (attempts keep their own)
MAX_CONFLICT_ROUNDS = 20
LEASE_TTL_S = 60.0  # a crashed holder's lease blocks others this long at most (renewed every third of it)
LAYOUT = 2  # 2: task pages; runs of layout 1 (one row per task) are not read


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
        self._pages: dict[str, dict[int, _Page]] = {}  # run_id -> page number -> page (last read/written)

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
        """Manifest parts, task pages and the index first, the run head last: the head is the
        commit marker. A client stopped part-way leaves items no read can reach (``get_run``,
        ``list_runs`` and ``resume`` all start at the head), never a half-recorded run."""
        pk = _run_pk(run.run_id)
        blob = gzip.compress(manifest, mtime=0)
        parts = [blob[i : i + MANIFEST_PART] for i in range(0, len(blob), MANIFEST_PART)] or [b""]
        run = run.replace(updated_at=run.updated_at or run.created_at)
        pages = [list(tasks[i : i + PAGE_TASKS]) for i in range(0, len(tasks), PAGE_TASKS)]
        with self._errors(f"record run {run.run_id}"):
            try:
                exists = self._get(pk, "RUN") is not None
            except self.client.exceptions.ResourceNotFoundException:
                # First run in this account/region: make the table (provisioning would find it).
                self.create_table_if_missing()
                exists = False
            if exists:
                raise StateError(f"run {run.run_id} exists already", "use `corral resume` to go on with it")
            items: list[dict[str, Any]] = [
                {"pk": _s(pk), "sk": _s(f"MANIFEST#{i:04d}"), "b": {"B": part}} for i, part in enumerate(parts)
            ]
            cache: dict[int, _Page] = {}
            for n, records in enumerate(pages):
                page = _Page(n, 1, records)
                cache[n] = page
                items.append(page.item(run.run_id))
            items.append(
                {"pk": _s("RUNS"), "sk": _s(f"{run.created_at:020.6f}#{run.run_id}"), "run_id": _s(run.run_id)}
            )
            self._batch_put(items)
            self._put_run_head(run, len(parts), len(pages))  # the commit
        self._pages[run.run_id] = cache

    def _put_run_head(self, run: RunRecord, parts: int, pages: int) -> None:
        try:
            self.client.put_item(
                TableName=self.table,
                Item={
                    "pk": _s(_run_pk(run.run_id)), "sk": _s("RUN"), "d": _s(_run_json(run)), "chunks": _n(parts),
                    "pages": _n(pages), "layout": _n(LAYOUT),
                },
                ConditionExpression="attribute_not_exists(pk)",
            )
        except self.client.exceptions.ConditionalCheckFailedException:
            raise StateError(f"run {run.run_id} exists already", "use `corral resume` to go on with it") from None

    def _get(self, pk: str, sk: str) -> dict[str, Any] | None:
        item: dict[str, Any] | None = self.client.get_item(
            TableName=self.table, Key={"pk": _s(pk), "sk": _s(sk)}, ConsistentRead=True
        ).get("Item")
        return item

    def get_run(self, run_id: str) -> RunRecord:
        with self._errors(f"read run {run_id}"):
            item = self._get(_run_pk(run_id), "RUN")
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
            for item in self._batch_get(keys):  # an index entry without a head: a run never committed
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
            head = self._get(_run_pk(run_id), "RUN")
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
        with self._errors(f"read the tasks of run {run_id}"):
            pages = self._load_pages(run_id)
        out: list[TaskRecord] = []
        for n in sorted(pages):
            out += [t for t in pages[n].records if wanted is None or t.state in wanted]
        return out

    def save_tasks(self, tasks: Sequence[TaskRecord]) -> None:
        """Upsert whole task records of existing runs (unknown task ids are ignored, like SQLite):
        one conditional write per page touched, whatever the number of tasks on it."""
        if not tasks:
            return
        by_run: dict[str, dict[str, TaskRecord]] = {}
        for t in tasks:
            by_run.setdefault(t.run_id, {})[t.task_id] = t  # a task given twice: its last version
        for run_id, new in by_run.items():
            self._update(run_id, new, lambda current, t: True)

    def swap_task(self, old: TaskRecord, new: TaskRecord) -> bool:
        """Written only while the stored record is still ``old`` (a conditional write of its page)."""
        return bool(self.update_tasks([(old, new)]))

    def update_tasks(self, pairs: Sequence[tuple[TaskRecord, TaskRecord]]) -> list[TaskRecord]:
        """For each (old, new): write ``new`` only where the stored record is still ``old``; the
        records written. What a refresh uses, so another process's claim is never overwritten."""
        expected = {(o.run_id, o.task_id): o for o, _ in pairs}
        by_run: dict[str, dict[str, TaskRecord]] = {}
        for o, n in pairs:
            by_run.setdefault(o.run_id, {})[o.task_id] = n
        written: list[TaskRecord] = []
        for run_id, new in by_run.items():
            written += self._update(run_id, new, lambda current, t: current == expected[(t.run_id, t.task_id)])
        return written

    def restore_tasks(self, run_id: str, tasks: Sequence[TaskRecord]) -> int:
        """Record the tasks the run does not hold yet (new pages); the number added."""
        with self._errors(f"restore the tasks of run {run_id}"):
            pages = self._load_pages(run_id)
            known = {t.task_id for p in pages.values() for t in p.records}
            missing = [t for t in tasks if t.task_id not in known]
            first = max(pages, default=-1) + 1
            for i in range(0, len(missing), PAGE_TASKS):
                page = _Page(first + i // PAGE_TASKS, 1, missing[i : i + PAGE_TASKS])
                self.client.put_item(
                    TableName=self.table, Item=page.item(run_id), ConditionExpression="attribute_not_exists(pk)"
                )
                pages[page.number] = page
        return len(missing)

    def _load_pages(self, run_id: str) -> dict[int, _Page]:
        pages = {}
        for item in self._query(run_id, "PAGE#"):
            page = _Page.from_item(run_id, item)
            pages[page.number] = page
        self._pages[run_id] = pages
        return pages

    def _reload_page(self, run_id: str, number: int) -> _Page | None:
        item = self._get(_run_pk(run_id), f"PAGE#{number:06d}")
        page = _Page.from_item(run_id, item) if item is not None else None
        if page is not None:
            self._pages.setdefault(run_id, {})[number] = page
        return page

    def _update(
        self, run_id: str, new: dict[str, TaskRecord], accept: Callable[[TaskRecord, TaskRecord], bool]
    ) -> list[TaskRecord]:
        """Apply ``new`` (task id -> record) to the pages holding those tasks, where ``accept``
        (stored, new) says so. Each page is written with ``v = <version read>`` as condition; a
        page someone else wrote meanwhile is read again and the changes applied again."""
        with self._errors(f"save the task states of run {run_id}"):
            pages = self._pages.get(run_id)
            if pages is None or any(_locate(pages, tid) is None for tid in new):
                pages = self._load_pages(run_id)
            touched: dict[int, dict[str, TaskRecord]] = {}
            for tid, rec in new.items():
                where = _locate(pages, tid)
                if where is not None:
                    touched.setdefault(where, {})[tid] = rec
            work = [(n, changes) for n, changes in touched.items()]
            if len(work) <= 1:
                results = [self._update_page(run_id, n, changes, accept) for n, changes in work]
            else:
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(max_workers=min(WRITERS, len(work))) as pool:
                    futures = [pool.submit(self._update_page, run_id, n, c, accept) for n, c in work]
                    results = [f.result() for f in futures]
        return [t for r in results for t in r]

    def _update_page(
        self, run_id: str, number: int, changes: dict[str, TaskRecord],
        accept: Callable[[TaskRecord, TaskRecord], bool],
    ) -> list[TaskRecord]:
        page = self._pages[run_id][number]
        verified = False  # the page was read from the table for this update (not the cache)
        for round_ in range(MAX_CONFLICT_ROUNDS):
            records = list(page.records)
            index = page.index()
            written = []
            for tid, rec in changes.items():
                i = index[tid]
                if accept(records[i], rec):
                    records[i] = rec
                    written.append(rec)
            if len(written) < len(changes) and not verified:
                fresh = self._reload_page(run_id, number)  # refused by a cached page: look again
                if fresh is None:
                    return []
                page, verified = fresh, True
                continue
            if not written:
                return []
            nxt = _Page(number, page.version + 1, records)
            try:
                self.client.put_item(
                    TableName=self.table, Item=nxt.item(run_id), ConditionExpression="v = :v",
                    ExpressionAttributeValues={":v": _n(page.version)},
                )
            except self.client.exceptions.ConditionalCheckFailedException:
                fresh = self._reload_page(run_id, number)
                if fresh is None:
                    return []
                page, verified = fresh, True
                self._backoff(min(round_, 4))
                continue
            self._pages[run_id][number] = nxt
            return written
        raise StateError(
            f"page {number} of run {run_id}'s tasks kept changing under {MAX_CONFLICT_ROUNDS} writes",
            "another process writes the same run; try again",
        )

    # -- one writer per run -------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self, run_id: str, purpose: str, wait: float = LEASE_WAIT_S) -> Iterator[None]:
        """Hold the run's lease item (see :mod:`corral.state.lease`); re-entrant in a process."""
        key = (self.table, run_id)
        with _dynamo_lock:
            held = _held_dynamo.get(key)
            if held is not None:
                held.depth += 1
        if held is None:
            held = self._acquire(run_id, purpose, wait)
            with _dynamo_lock:
                _held_dynamo[key] = held
        try:
            yield
        finally:
            with _dynamo_lock:
                held.depth -= 1
                last = held.depth == 0
                if last:
                    del _held_dynamo[key]
            if last:
                held.stop.set()
                with contextlib.suppress(Exception), self._errors(f"release the lease of run {run_id}"):
                    self.client.delete_item(
                        TableName=self.table, Key={"pk": _s(_run_pk(run_id)), "sk": _s("LEASE")},
                        ConditionExpression="#o = :me", ExpressionAttributeValues={":me": _s(held.owner)},
                        ExpressionAttributeNames={"#o": "owner"},  # OWNER is a reserved word
                    )

    def _acquire(self, run_id: str, purpose: str, wait: float) -> _DynamoLease:
        me = Holder.me(purpose)
        owner = f"{me.host}:{me.pid}:{secrets.token_hex(6)}"
        key = {"pk": _s(_run_pk(run_id)), "sk": _s("LEASE")}
        deadline = time.monotonic() + max(0.0, wait)
        delay = 0.05
        with self._errors(f"take the lease of run {run_id}"):
            made = False
            while True:
                try:
                    self.client.put_item(
                        TableName=self.table,
                        Item={**key, "owner": _s(owner), "holder": _s(me.as_json()),
                              "expires": _n(time.time() + LEASE_TTL_S)},
                        ConditionExpression="attribute_not_exists(pk) OR #e < :now",
                        ExpressionAttributeValues={":now": _n(time.time())}, ExpressionAttributeNames={"#e": "expires"},
                    )
                    break
                except self.client.exceptions.ResourceNotFoundException:
                    if made:
                        raise
                    self.create_table_if_missing()  # first use in this account/region, as create_run does
                    made = True
                except self.client.exceptions.ConditionalCheckFailedException:
                    if time.monotonic() >= deadline:
                        item = self._get(key["pk"]["S"], "LEASE") or {}
                        holder = Holder.from_json(item.get("holder", {}).get("S", ""))
                        left = float(item.get("expires", {}).get("N", "0")) - time.time()
                        raise LeaseHeld(run_id, holder, f"; its lease expires in {max(0, int(left))} s") from None
                    self._sleep(min(delay, max(0.0, deadline - time.monotonic())))
                    delay = min(delay * 2, 0.5)
        held = _DynamoLease(owner=owner, depth=1, stop=threading.Event())
        threading.Thread(target=self._renew, args=(run_id, held), daemon=True, name=f"lease-{run_id}").start()
        return held

    def _renew(self, run_id: str, held: _DynamoLease) -> None:
        while not held.stop.wait(LEASE_TTL_S / 3):
            with contextlib.suppress(Exception):
                self.client.update_item(
                    TableName=self.table, Key={"pk": _s(_run_pk(run_id)), "sk": _s("LEASE")},
                    UpdateExpression="SET #e = :e", ConditionExpression="#o = :me",
                    ExpressionAttributeValues={":e": _n(time.time() + LEASE_TTL_S), ":me": _s(held.owner)},
                    ExpressionAttributeNames={"#e": "expires", "#o": "owner"},
                )

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


@dataclasses.dataclass
class _DynamoLease:
    owner: str
    depth: int
    stop: threading.Event


_held_dynamo: dict[tuple[str, str], _DynamoLease] = {}
_dynamo_lock = threading.Lock()


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
        from corral.aws_api import error_code, translate
        from corral.errors import CredentialsError

        err = translate(exc, f"{self.action} in DynamoDB table {self.table}")
        if isinstance(err, CredentialsError):
            raise err from exc
        if error_code(exc) == "ResourceNotFoundException":  # ('' for connection errors: no response)
            raise StateError(
                f"DynamoDB table {self.table} does not exist (while trying to {self.action})",
                "run `corral aws setup` (it creates the state table) or check the region",
            ) from exc
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            raise StateError(
                f"lost the connection to DynamoDB (table {self.table}) while trying to {self.action}: {exc}",
                "check the network (and AWS_ENDPOINT_URL if set), then run the command again: "
                "a run is recorded whole or not at all",
            ) from exc
        message = err.message if err else f"could not {self.action} in DynamoDB table {self.table}: {exc}"
        raise StateError(message, "check the table and your permissions; rerun with --debug for details") from exc


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


_TASK_FIELDS = [f.name for f in dataclasses.fields(TaskRecord) if f.name != "run_id"]


def _task_row(t: TaskRecord) -> list[Any]:
    row: list[Any] = [getattr(t, f) for f in _TASK_FIELDS]
    row[_TASK_FIELDS.index("state")] = t.state.value
    reason = _TASK_FIELDS.index("reason")
    if len(row[reason]) > MAX_REASON:
        row[reason] = row[reason][: MAX_REASON - 1] + "…"
    return row


def _task_from_row(run_id: str, row: list[Any]) -> TaskRecord:
    d = dict(zip(_TASK_FIELDS, row, strict=True))
    d["state"] = TaskState(d["state"])
    return TaskRecord(run_id=run_id, **d)


def _locate(pages: dict[int, _Page], task_id: str) -> int | None:
    for n, page in pages.items():
        if task_id in page.index():
            return n
    return None


@dataclasses.dataclass
class _Page:
    """Up to PAGE_TASKS task records of one run in plan order, gzip-compressed JSON in one item,
    with a version ``v`` that every write checks and raises (optimistic concurrency)."""

    number: int
    version: int
    records: list[TaskRecord]
    _index: dict[str, int] | None = None

    def index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {t.task_id: i for i, t in enumerate(self.records)}
        return self._index

    def item(self, run_id: str) -> dict[str, Any]:
        body = json.dumps([_task_row(t) for t in self.records], separators=(",", ":")).encode()
        blob = gzip.compress(body, compresslevel=6, mtime=0)
        if len(blob) > MANIFEST_PART:
            raise StateError(
                f"page {self.number} of run {run_id}'s tasks is {len(blob)} bytes compressed, over DynamoDB's "
                "400 KB item limit", "this is a corral bug: report it with the workflow",
            )
        return {
            "pk": _s(_run_pk(run_id)), "sk": _s(f"PAGE#{self.number:06d}"), "v": _n(self.version), "b": {"B": blob},
        }

    @classmethod
    def from_item(cls, run_id: str, item: dict[str, Any]) -> _Page:
        rows = json.loads(gzip.decompress(bytes(item["b"]["B"])))
        return cls(int(item["sk"]["S"].split("#", 1)[1]), int(item["v"]["N"]), [_task_from_row(run_id, r) for r in rows])


def _attempt_dict(a: AttemptRecord) -> dict[str, Any]:
    d = dataclasses.asdict(a)
    d["state"] = a.state.value
    return d


def _attempt_from_dict(d: dict[str, Any]) -> AttemptRecord:
    d = dict(d)
    d["state"] = TaskState(d["state"])
    return AttemptRecord(**d)
