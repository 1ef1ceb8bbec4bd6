"""Waiting is bounded polling with backoff (no fixed sleeps): the poller, and EFS waited for."""

from __future__ import annotations

from typing import Any

import pytest

from corral.backends.aws_batch.common import Ctx
from corral.backends.aws_batch.network import Network
from corral.backends.aws_batch.provision import ProvisionReport
from corral.backends.aws_batch.storage import ensure_efs
from corral.backends.aws_batch.waiting import Poller
from corral.errors import ProvisionError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def clock(self) -> float:
        return self.now


def test_poller_backs_off_and_stops_at_its_bound() -> None:
    fc = FakeClock()
    p = Poller(first=1, factor=2, cap=5, sleep=fc.sleep, clock=fc.clock)
    answers = iter([None, None, None, None, "done"])
    assert p.poll(lambda: next(answers), what="x") == "done"
    assert fc.sleeps == [1, 2, 4, 5]
    fc2 = FakeClock()
    p2 = Poller(first=1, factor=2, cap=5, sleep=fc2.sleep, clock=fc2.clock)
    with pytest.raises(ProvisionError, match="timed out after 12s waiting for the thing"):
        p2.poll(lambda: False, what="the thing", timeout=12)
    assert sum(fc2.sleeps) == 12  # never sleeps past the deadline


class FakeEfs:
    """Just enough of EFS: a file system and mount targets that take a few polls to be available."""

    def __init__(self, polls_until_ready: int = 3) -> None:
        self.left = polls_until_ready
        self.fs: dict[str, Any] | None = None
        self.targets: list[dict[str, Any]] = []

    def _tick(self) -> str:
        self.left -= 1
        return "available" if self.left <= 0 else "creating"

    def describe_file_systems(self, CreationToken: str) -> dict[str, Any]:
        if self.fs:
            self.fs["LifeCycleState"] = self._tick()
        return {"FileSystems": [self.fs] if self.fs else []}

    def create_file_system(self, **kw: Any) -> dict[str, Any]:
        self.fs = {"FileSystemId": "fs-1", "LifeCycleState": "creating", **kw}
        return dict(self.fs)

    def describe_mount_targets(self, FileSystemId: str) -> dict[str, Any]:
        for t in self.targets:
            t["LifeCycleState"] = self._tick()
        return {"MountTargets": self.targets}

    def create_mount_target(self, FileSystemId: str, SubnetId: str, SecurityGroups: list[str]) -> dict[str, Any]:
        self.left = 3
        assert SecurityGroups == ["sg-efs"]  # corral's own group, not the compute group
        t = {"MountTargetId": f"fsmt-{SubnetId}", "SubnetId": SubnetId, "LifeCycleState": "creating",
             "AvailabilityZoneName": {"s1": "a", "s2": "b", "s3": "a"}[SubnetId]}
        self.targets.append(t)
        return t

    policy: str | None = None

    def describe_file_system_policy(self, FileSystemId: str) -> dict[str, Any]:
        if self.policy is None:
            from botocore.exceptions import ClientError

            raise ClientError({"Error": {"Code": "PolicyNotFound", "Message": "none"}}, "DescribeFileSystemPolicy")
        return {"Policy": self.policy}

    def put_file_system_policy(self, FileSystemId: str, Policy: str) -> dict[str, Any]:
        self.policy = Policy
        return {"Policy": Policy}


class FakeEc2:
    """corral's EFS security group, already there and open to NFS from the compute group sg-1."""

    def describe_security_groups(self, Filters: list[dict[str, Any]]) -> dict[str, Any]:
        return {"SecurityGroups": [{
            "GroupId": "sg-efs", "Tags": [{"Key": "corral:managed", "Value": "true"}],
            "IpPermissions": [{"IpProtocol": "tcp", "FromPort": 2049, "ToPort": 2049,
                               "UserIdGroupPairs": [{"GroupId": "sg-1"}]}]}]}


class FakeClients:
    region = "us-east-2"

    def __init__(self, efs: FakeEfs) -> None:
        self.efs = efs
        self.ec2 = FakeEc2()

    def account_id(self) -> str:
        return "123456789012"

    def partition(self) -> str:
        return "aws"


def test_efs_is_waited_for_by_polling_with_one_target_per_zone() -> None:
    fc = FakeClock()
    efs = FakeEfs()
    ctx = Ctx(clients=FakeClients(efs), report=ProvisionReport(), tags={"corral:managed": "true"},
              poller=Poller(sleep=fc.sleep, clock=fc.clock))
    net = Network(vpc_id="vpc-1", subnets=["s1", "s2", "s3"], security_groups=["sg-1"],
                  zones={"s1": "a", "s2": "b", "s3": "a"})
    fs_id, ap = ensure_efs(ctx, net)
    assert fs_id == "fs-1" and ap is None
    assert [t["SubnetId"] for t in efs.targets] == ["s1", "s2"]  # s3 shares zone a with s1
    assert fc.sleeps and all(s <= 15 for s in fc.sleeps)
    assert efs.fs["Encrypted"] is True and efs.fs["CreationToken"] == "corral-workspace"


def test_efs_that_never_becomes_available_times_out() -> None:
    fc = FakeClock()
    efs = FakeEfs(polls_until_ready=10**9)
    ctx = Ctx(clients=FakeClients(efs), report=ProvisionReport(), tags={},
              poller=Poller(sleep=fc.sleep, clock=fc.clock))
    net = Network(vpc_id="vpc-1", subnets=["s1"], security_groups=["sg-1"], zones={"s1": "a"})
    with pytest.raises(ProvisionError, match="EFS file system fs-1"):
        ensure_efs(ctx, net, timeout=60)
    assert fc.now == 60


class FakeBatch:
    """A compute environment that Batch marks INVALID the first `bad` times it is made."""

    def __init__(self, bad: int, reason: str = "CLIENT_ERROR - Invalid IamInstanceProfile: arn:...") -> None:
        self.bad, self.reason = bad, reason
        self.ce: dict[str, Any] | None = None
        self.calls: list[str] = []

    def describe_compute_environments(self, computeEnvironments: list[str]) -> dict[str, Any]:
        self.calls.append("describe")
        return {"computeEnvironments": [self.ce] if self.ce else []}

    def create_compute_environment(self, **kw: Any) -> dict[str, Any]:
        self.calls.append("create")
        invalid = self.bad > 0
        self.bad -= 1
        self.ce = {"computeEnvironmentName": kw["computeEnvironmentName"], "computeEnvironmentArn": "arn:ce",
                   "state": "ENABLED", "status": "INVALID" if invalid else "VALID",
                   "statusReason": self.reason if invalid else "", "computeResources": kw["computeResources"]}
        return {}

    def update_compute_environment(self, computeEnvironment: str, state: str) -> dict[str, Any]:
        self.calls.append(f"update {state}")
        assert self.ce is not None
        self.ce["state"] = state
        return {}

    def delete_compute_environment(self, computeEnvironment: str) -> dict[str, Any]:
        self.calls.append("delete")
        self.ce = None
        return {}


class BatchClients:
    region = "us-east-2"

    def __init__(self, batch: FakeBatch) -> None:
        self.batch = batch


def _spec() -> Any:
    from corral.backends.aws_batch.compute import ComputeSpec

    net = Network(vpc_id="vpc-1", subnets=["s1"], security_groups=["sg-1"], zones={"s1": "a"})
    return ComputeSpec(kind="ec2", instance_types=["optimal"], network=net, instance_profile="arn:profile",
                       max_vcpus=16)


def test_an_environment_invalid_for_a_not_yet_visible_profile_is_made_again() -> None:
    from corral.backends.aws_batch.compute import ensure_compute_environment

    fc = FakeClock()
    batch = FakeBatch(bad=1)
    report = ProvisionReport()
    ctx = Ctx(clients=BatchClients(batch), report=report, tags={}, poller=Poller(sleep=fc.sleep, clock=fc.clock))
    assert ensure_compute_environment(ctx, _spec()) == "arn:ce"
    assert batch.calls.count("create") == 2 and "delete" in batch.calls and "update DISABLED" in batch.calls
    assert any("made again" in u for u in report.updated)


def test_an_environment_invalid_for_another_reason_is_an_error() -> None:
    from corral.backends.aws_batch.compute import InvalidEnvironment, ensure_compute_environment

    fc = FakeClock()
    batch = FakeBatch(bad=5, reason="CLIENT_ERROR - subnet has no route to the internet")
    ctx = Ctx(clients=BatchClients(batch), report=ProvisionReport(), tags={},
              poller=Poller(sleep=fc.sleep, clock=fc.clock))
    with pytest.raises(InvalidEnvironment, match="no route"):
        ensure_compute_environment(ctx, _spec())
    assert batch.calls.count("create") == 1
    # and a profile that never becomes visible stops after a bounded number of attempts
    batch = FakeBatch(bad=100)
    ctx = Ctx(clients=BatchClients(batch), report=ProvisionReport(), tags={},
              poller=Poller(sleep=fc.sleep, clock=fc.clock))
    with pytest.raises(InvalidEnvironment, match="IamInstanceProfile"):
        ensure_compute_environment(ctx, _spec())
    assert batch.calls.count("create") == 4
