"""Real Slurm clusters (munged, slurmctld, slurmd on 127.0.0.1), each started once per session.

``slurm``: no accounting (``accounting_storage/none``): the backend reads squeue.
``any_slurm``: the same tests on that cluster and on one with accounting (MariaDB + slurmdbd), where
the backend reads sacct. Tests skip, saying why, where the daemons cannot start (not root, packages
missing). ``SLURM_CONF`` points every client command at the test's cluster.
"""

from __future__ import annotations

import pytest
from slurm_cluster import ClusterUnavailable, SlurmCluster, shared_cluster


def _cluster(accounting: bool) -> SlurmCluster:
    try:
        return shared_cluster(accounting)
    except ClusterUnavailable as exc:
        what = " with accounting (slurmdbd + MariaDB)" if accounting else ""
        pytest.skip(f"no Slurm cluster{what} here: {exc}")


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    return _cluster(False)


@pytest.fixture(scope="session")
def slurm_acct_cluster() -> SlurmCluster:
    return _cluster(True)


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    return slurm_cluster


@pytest.fixture(params=["squeue", "sacct"])
def any_slurm(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SlurmCluster:
    cluster: SlurmCluster = request.getfixturevalue("slurm_cluster" if request.param == "squeue"
                                                    else "slurm_acct_cluster")
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    return cluster
