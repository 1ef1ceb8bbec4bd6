"""One real Slurm cluster (munged, slurmctld, slurmd on 127.0.0.1) for the whole session.

Tests that use ``slurm`` skip, saying why, where the daemons cannot start (not root, packages
missing). ``SLURM_CONF`` points every client command at the cluster.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_cluster import ClusterUnavailable, SlurmCluster

_CLUSTER: dict[str, object] = {}


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    root = Path(tempfile.mkdtemp(prefix="corral-slurm-"))
    try:
        cluster = SlurmCluster(root).start()
    except ClusterUnavailable as exc:
        pytest.skip(f"no Slurm cluster here: {exc}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    return slurm_cluster
