"""A moto server on 127.0.0.1 for the AWS tests (never real AWS, never another address)."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

REGION = "us-east-2"
ACCOUNT = "123456789012"  # moto's default account, which the tests' ARNs spell out

# What each AWS test costs is mostly moto building its backends (measured, moto 5.2, 2 cores):
# - Without MOTO_ACCOUNT_ID moto finds a request's account by looking its access key up in the IAM
#   backend of every partition (aws, aws-cn, aws-us-gov, aws-iso, aws-iso-b), creating each with its
#   1,582 managed policies: ~1 s after every reset. The tests' dummy key belongs to no account, so the
#   answer was always the default account; saying so up front gives the same account, at once.
# - MOTO_EC2_LOAD_DEFAULT_AMIS: moto's EC2 backend otherwise makes 1,288 AMIs with a snapshot and a
#   volume each (~0.3 s per region, after every reset). corral never asks for an AMI (Batch picks
#   the ECS-optimized image; corral only names an image *type*), and no test does.
SERVER_ENVIRONMENT = {
    "MOTO_IAM_LOAD_MANAGED_POLICIES": "true",  # AWS-managed policy ARNs can be attached
    "MOTO_ACCOUNT_ID": ACCOUNT,
    "MOTO_EC2_LOAD_DEFAULT_AMIS": "false",
}


_IN_THIS_PROCESS: set[str] = set()  # URLs of the servers moto_server() runs here


@contextmanager
def moto_server() -> Iterator[str]:
    for name, value in SERVER_ENVIRONMENT.items():  # read by moto in this process, per request
        os.environ.setdefault(name, value)
    from moto.server import ThreadedMotoServer

    _parse_managed_policies_once()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://127.0.0.1:{port}"
    configure(url, {"batch": {"use_docker": False}})
    _IN_THIS_PROCESS.add(url)
    try:
        yield url
    finally:
        _IN_THIS_PROCESS.discard(url)
        server.stop()


def _parse_managed_policies_once() -> None:
    """moto's IAM backend parses its 4.7 MB table of AWS-managed policies (json.loads, then one
    json.dumps and two date parses per policy) each time it is created, which is on the first
    request of every AWS test (moto marks the account visited in IAM on every request): more than
    half of what a test's moto backends cost. The table is constant, so it is parsed once here; every
    backend still gets its own 1,582 policy objects, made with exactly the arguments moto's
    ``AWSManagedPolicy.from_data`` gives them. Should moto's layout differ, it parses as before."""
    try:
        from datetime import datetime

        from moto.iam import models
        from moto.settings import load_iam_aws_managed_policies

        backend, policy, data = models.IAMBackend, models.AWSManagedPolicy, models.aws_managed_policies_data
        original = backend._init_aws_policies
    except (ImportError, AttributeError):
        return
    if getattr(original, "parsed_once", False):
        return
    prepared: list[tuple[str, dict[str, Any]]] = []

    def init_aws_policies(self: Any) -> list[Any]:
        if not load_iam_aws_managed_policies():
            return []
        if not prepared:  # as AWSManagedPolicy.from_data does for each, once
            prepared.extend(
                (name, {"default_version_id": d.get("DefaultVersionId"), "path": d.get("Path"),
                        "document": json.dumps(d.get("Document")),
                        "create_date": datetime.fromisoformat(d["CreateDate"]),
                        "update_date": datetime.fromisoformat(d["UpdateDate"])})
                for name, d in json.loads(data).items()
            )
        return [policy(name, account_id=self.account_id, region=self.region_name, **kw) for name, kw in prepared]

    init_aws_policies.parsed_once = True  # type: ignore[attr-defined]
    backend._init_aws_policies = init_aws_policies


def configure(url: str, config: dict) -> None:
    req = urllib.request.Request(
        f"{url}/moto-api/config", data=json.dumps(config).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=10).read()


def reset(url: str) -> None:
    """Forget everything the server holds, as ``POST /moto-api/reset`` does.

    moto's own reset calls ``reset()`` on every backend it holds and then drops them all; the next
    request makes fresh ones. ``BaseBackend.reset`` only re-creates the backend (IAM with its 1,582
    managed policies, EC2, ...) just before it is dropped: ~0.5 s per test of work thrown away. The
    server runs in this process (:func:`moto_server`), so the same is done here under moto's backend
    lock, calling ``reset()`` only on the backends whose class has cleanup of its own (S3 closes its
    temporary files and frees bucket names; Batch stops job threads). The HTTP reset is the fallback
    for a server elsewhere or should moto's layout change."""
    try:
        if url not in _IN_THIS_PROCESS:
            raise LookupError(url)
        from moto.core.base_backend import BackendDict, BaseBackend, backend_lock
        from moto.core.model_instances import reset_model_data

        instances = BackendDict._instances
    except (LookupError, ImportError, AttributeError):
        req = urllib.request.Request(f"{url}/moto-api/reset", data=b"", method="POST")
        urllib.request.urlopen(req, timeout=60).read()  # (a loaded 2-core machine: 10 s was not always enough)
        return
    with backend_lock:
        for backend_dict in instances:
            for account in backend_dict.values():
                for backend in account.values():
                    if type(backend).reset is not BaseBackend.reset:
                        backend.reset()
            backend_dict.clear()
        instances.clear()
    reset_model_data()


def default_vpc_as_on_aws(url: str, region: str = REGION) -> None:
    """Give moto's default VPC what AWS's has and moto's lacks: an internet gateway attached and the
    main route table's 0.0.0.0/0 route to it (Amazon VPC User Guide, "Default VPCs": "an internet
    gateway ... a route in the main route table that points all traffic (0.0.0.0/0) to the internet
    gateway"). Without it corral's network preflight would rightly refuse moto's default VPC."""
    import boto3

    ec2 = boto3.client("ec2", region_name=region, endpoint_url=url, aws_access_key_id="testing",
                       aws_secret_access_key="testing")
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        return
    vpc = vpcs[0]["VpcId"]
    if ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [vpc]}])["InternetGateways"]:
        return
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    main = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                              {"Name": "association.main", "Values": ["true"]}])["RouteTables"][0]
    ec2.create_route(RouteTableId=main["RouteTableId"], DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
