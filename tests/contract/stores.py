"""Factories of every StateStore implementation; the contract suite runs against each."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from corral.state.base import StateStore


def sqlite_store(tmp_path: Path, request: pytest.FixtureRequest) -> StateStore:
    from corral.state.sqlite import SqliteStore

    return SqliteStore(tmp_path / "state.db")


def dynamodb_store(tmp_path: Path, request: pytest.FixtureRequest) -> StateStore:
    pytest.importorskip("corral.state.dynamodb", reason="the DynamoDB store is not there yet")
    import boto3

    from corral.state.dynamodb import DynamoStore

    request.getfixturevalue("aws")
    client = boto3.client("dynamodb")
    store = DynamoStore("corral-state-test", client)
    if hasattr(DynamoStore, "create_table_if_missing"):
        store.create_table_if_missing()  # type: ignore[attr-defined]
    return store


STORE_FACTORIES: dict[str, Callable[[Path, Any], StateStore]] = {
    "sqlite": sqlite_store,
    "dynamodb": dynamodb_store,
}
