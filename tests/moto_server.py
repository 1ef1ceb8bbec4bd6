"""A moto server on 127.0.0.1 for the AWS tests (never real AWS, never another address)."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

REGION = "us-east-2"


@contextmanager
def moto_server() -> Iterator[str]:
    os.environ.setdefault("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://127.0.0.1:{port}"
    configure(url, {"batch": {"use_docker": False}})
    try:
        yield url
    finally:
        server.stop()


def configure(url: str, config: dict) -> None:
    req = urllib.request.Request(
        f"{url}/moto-api/config", data=json.dumps(config).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    urllib.request.urlopen(req, timeout=10).read()


def reset(url: str) -> None:
    req = urllib.request.Request(f"{url}/moto-api/reset", data=b"", method="POST")
    urllib.request.urlopen(req, timeout=60).read()  # (a loaded 2-core machine: 10 s was not always enough)


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
