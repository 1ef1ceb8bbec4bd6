"""One route per stage (corral.routes): decided once, and every consumer — payloads (requirements),
submission (queue), cost (placement), provisioning (Fargate, disk), the plan check and doctor (fit)
— reads the same answer."""

from __future__ import annotations

import pytest

from corral import cost, doctor, routes
from corral.backends.aws_batch import payloads as pl
from corral.backends.aws_batch.submit import Queues
from corral.errors import PlanError
from corral.instances import expand, load_instance_types
from corral.plan import make_plan
from corral.spec import Resources, loads_workflow

SIZES = [
    "{vcpus: 0.5, memory: 1GiB}", "{vcpus: 2, memory: 4GiB}", "{vcpus: 4, memory: 16GiB, gpus: 1}",
    "{vcpus: 16, memory: 250GiB}", "{vcpus: 0.25, memory: 512MiB, disk: 50GiB}", "{vcpus: 64, memory: 100GiB}",
    "{vcpus: 8, memory: 30GiB, gpus: 9}", "{vcpus: 1, memory: 2GiB, disk: 300GiB}",
]
ALLOWED = [["optimal"], ["c5"], ["optimal", "fargate"], ["fargate"], ["m6i.large", "g4dn"], ["x9z"]]
CTX = pl.JobContext(region="us-east-2", account_id="123456789012",
                    execution_role_arn="arn:aws:iam::123456789012:role/exec")


def _stage(res: str):  # type: ignore[no-untyped-def]
    return loads_workflow(f"name: w\nstages: [{{name: s, image: x, command: 'true', resources: {res}}}]\n").stages[0]


def test_a_route_is_decided_once() -> None:
    a = routes.route(Resources(vcpus=2, memory=4096), ["optimal"])
    assert routes.route(Resources(vcpus=2, memory=4096), ("optimal",)) is a
    assert routes.route(Resources(vcpus=2, memory=4096), ["c5"]) is not a


@pytest.mark.parametrize("allowed", ALLOWED, ids=lambda a: "+".join(a))
@pytest.mark.parametrize("size", SIZES)
def test_every_consumer_reads_the_same_route(size: str, allowed: list[str]) -> None:
    stage = _stage(size)
    rt = routes.route(stage.resources, allowed)
    # the plan check refuses exactly what does not fit (Fargate-only refuses what Fargate cannot run)
    only_fargate = allowed == ["fargate"]
    refused = False
    try:
        routes.check_fits(make_plan(loads_workflow(
            f"name: w\nitems: [{{s: a}}]\nstages: [{{name: s, image: x, command: 'true', resources: {size}}}]\n")),
            allowed)
    except PlanError:
        refused = True
    too_much_disk = (stage.resources.disk or 0) > 16 * 1024
    assert refused == ((not rt.fits) or (only_fargate and not rt.fargate) or too_much_disk)
    if refused:
        return
    # payloads: the job definition asks for the route's requirements
    spec = pl.job_definition(stage, CTX, fargate=rt.fargate)
    assert spec.kwargs["containerProperties"]["resourceRequirements"] == rt.requirements()
    assert spec.kwargs["platformCapabilities"] == (["FARGATE"] if rt.fargate else ["EC2"])
    # submission: the route's queue
    queues = Queues("q-cpu", "q-gpu", "q-fargate")
    assert queues.for_route(rt) == {"default": "q-cpu", "gpu": "q-gpu", "fargate": "q-fargate"}[rt.queue]
    # cost: placed on one of the route's instance types, packed by what Batch is asked for
    p = cost.place(stage.resources, allowed, spot=False)
    if rt.fargate:
        assert p is not None and p.instance.name.startswith("fargate-") and p.per_instance == 1
    elif rt.known:
        assert p is not None and p.instance.name in {t.name for t in expand(list(rt.entries))}
        assert p.per_instance == routes.tasks_per_instance(p.instance, rt.vcpus, rt.memory_mib, rt.gpus)
    # doctor judges a compute environment with the same rule
    if not rt.fargate:
        assert doctor._types_hold(rt.entries, rt.vcpus, rt.memory_mib, rt.gpus) == (rt.fits and rt.known, rt.known)


def test_fractional_vcpus_on_ec2_are_packed_as_whole_vcpus() -> None:
    """Batch on EC2 gets a whole vCPU per task (the job definition's VCPU is rounded up) and packs
    by it: cost and the root volume count 2 half-vCPU tasks per m5.large, not 4."""
    r = Resources(vcpus=0.5, memory=1024, disk=100)
    rt = routes.route(r, ["m5.large"])
    assert rt.vcpus == 1 and rt.requirements()[0] == {"type": "VCPU", "value": "1"}
    assert rt.per_largest == 2
    p = cost.place(r, ["m5.large"], spot=False)
    assert p is not None and p.per_instance == 2
    assert cost.placement_on("m5.large", r, spot=False).per_instance == 2  # type: ignore[union-attr]
    (need,) = routes.disk_needs([("s", r, 10)], ["m5.large"])
    assert routes.scratch_per_instance_gib([need]) == 200
    assert load_instance_types()["m5.large"].vcpus == 2
