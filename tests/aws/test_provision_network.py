"""The network preflight of setup and doctor, corral's EFS security group, doctor's EFS check by zone.

moto keeps route tables, gateways, VPC endpoints and security-group rules as data (it routes
nothing), which is all the preflight reads. What AWS does with them is checked only against its
documentation (see network.py)."""

from __future__ import annotations

from typing import Any

import pytest
from provision_helpers import CallLog, managed_census

from corral import doctor as dr
from corral.backends.aws_batch import AwsClients, Needs, ProvisionReport, ensure_environment
from corral.backends.aws_batch.network import EFS_GROUP, ENDPOINT_SERVICES, check_network
from corral.errors import ProvisionError
from corral.spec import AwsSettings

pytestmark = pytest.mark.aws
REGION = "us-east-2"


@pytest.fixture
def clients(aws: str) -> AwsClients:
    return AwsClients()


def _private_vpc(ec2: Any, zones: tuple[str, ...] = ("us-east-2a", "us-east-2b")) -> tuple[str, list[str], str]:
    """A VPC whose subnets have no route out (only the local route) and a group with egress to all."""
    vpc = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.7.{i}.0/24", AvailabilityZone=z)["Subnet"]["SubnetId"]
               for i, z in enumerate(zones, 1)]
    sg = ec2.create_security_group(GroupName="batch", Description="batch", VpcId=vpc)["GroupId"]
    return vpc, subnets, sg


def _main_table(ec2: Any, vpc: str) -> str:
    return ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                              {"Name": "association.main", "Values": ["true"]}])[
        "RouteTables"][0]["RouteTableId"]


def test_setup_refuses_a_subnet_with_no_way_out_and_makes_nothing(clients: AwsClients) -> None:
    ec2 = clients.ec2
    vpc, subnets, sg = _private_vpc(ec2)
    settings = AwsSettings(subnets=subnets, security_groups=[sg])
    with pytest.raises(ProvisionError) as err:
        ensure_environment(clients, settings, Needs())
    line = err.value.one_line()
    assert subnets[0] in line and "no route out" in line and "\n" not in line
    assert "NAT gateway" in err.value.hint and "VPC endpoints" in err.value.hint
    assert managed_census(clients) == {}  # refused before anything was made

    # A NAT gateway route in the subnets' (main) route table is a way out.
    nat = ec2.create_nat_gateway(SubnetId=subnets[0])["NatGateway"]["NatGatewayId"]
    ec2.create_route(RouteTableId=_main_table(ec2, vpc), DestinationCidrBlock="0.0.0.0/0", NatGatewayId=nat)
    ensure_environment(clients, settings, Needs())


def test_a_subnets_own_route_table_wins_over_the_main_one(clients: AwsClients) -> None:
    ec2 = clients.ec2
    vpc, subnets, sg = _private_vpc(ec2)
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    ec2.create_route(RouteTableId=_main_table(ec2, vpc), DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
    for s in subnets:
        ec2.modify_subnet_attribute(SubnetId=s, MapPublicIpOnLaunch={"Value": True})
    assert check_network(ec2, REGION, subnets, [sg]) == []
    isolated = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]  # only the local route
    ec2.associate_route_table(RouteTableId=isolated, SubnetId=subnets[1])
    (problem,) = check_network(ec2, REGION, subnets, [sg])
    assert problem.subject == subnets[1] and isolated in problem.message


def test_an_internet_gateway_needs_public_ips(clients: AwsClients) -> None:
    ec2 = clients.ec2
    vpc, subnets, sg = _private_vpc(ec2, ("us-east-2a",))
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    ec2.create_route(RouteTableId=_main_table(ec2, vpc), DestinationCidrBlock="0.0.0.0/0", GatewayId=igw)
    ec2.modify_subnet_attribute(SubnetId=subnets[0], MapPublicIpOnLaunch={"Value": False})
    (problem,) = check_network(ec2, REGION, subnets, [sg])
    assert "public IP" in problem.message and "--map-public-ip-on-launch" in problem.fix
    assert check_network(ec2, REGION, subnets, [sg], public_ip_from_job=True) == []  # Fargate's assignPublicIp


def test_vpc_endpoints_for_every_service_are_a_way_out(clients: AwsClients) -> None:
    ec2 = clients.ec2
    vpc, subnets, sg = _private_vpc(ec2)
    rt = _main_table(ec2, vpc)
    for svc in ENDPOINT_SERVICES[:-1]:  # all but S3
        ec2.create_vpc_endpoint(VpcId=vpc, ServiceName=f"com.amazonaws.{REGION}.{svc}", VpcEndpointType="Interface",
                                SubnetIds=subnets, SecurityGroupIds=[sg])
    problems = check_network(ec2, REGION, subnets, [sg])
    assert len(problems) == 2 and all(p.message.endswith("lacks endpoints for s3: jobs would stay RUNNABLE")
                                      for p in problems)
    ec2.create_vpc_endpoint(VpcId=vpc, ServiceName=f"com.amazonaws.{REGION}.s3", VpcEndpointType="Gateway",
                            RouteTableIds=[rt])
    assert check_network(ec2, REGION, subnets, [sg]) == []


def test_security_groups_must_allow_egress(clients: AwsClients) -> None:
    ec2 = clients.ec2
    default_sg = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": ["default"]}])[
        "SecurityGroups"][0]
    subnets = [s["SubnetId"] for s in ec2.describe_subnets()["Subnets"]][:1]
    closed = ec2.create_security_group(GroupName="closed", Description="no egress", VpcId=default_sg["VpcId"])["GroupId"]
    ec2.revoke_security_group_egress(GroupId=closed, IpPermissions=[
        {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    with pytest.raises(ProvisionError, match=f"security group\\(s\\) {closed} allow no outbound HTTPS"):
        ensure_environment(clients, AwsSettings(subnets=subnets, security_groups=[closed]), Needs())
    ec2.authorize_security_group_egress(GroupId=closed, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    assert check_network(ec2, REGION, subnets, [closed]) == []
    (nfs,) = check_network(ec2, REGION, subnets, [closed], efs=True)  # EFS also needs 2049 out
    assert "NFS (TCP 2049)" in nfs.message


def test_efs_gets_corrals_own_group_open_to_nfs_from_the_compute_groups_only(clients: AwsClients) -> None:
    ec2 = clients.ec2
    env = ensure_environment(clients, AwsSettings(), Needs(efs=True, run_id="r1"))
    (group,) = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [EFS_GROUP]}])["SecurityGroups"]
    assert {t["Key"]: t["Value"] for t in group["Tags"]}["corral:managed"] == "true"
    assert group["VpcId"] == ec2.describe_subnets(SubnetIds=env.subnets[:1])["Subnets"][0]["VpcId"]
    (rule,) = group["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 2049, 2049)
    assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == env.security_groups
    assert not rule.get("IpRanges") and group["IpPermissionsEgress"] == []
    targets = clients.efs.describe_mount_targets(FileSystemId=env.efs_id)["MountTargets"]
    assert len(targets) == 3
    for t in targets:
        assert clients.efs.describe_mount_target_security_groups(MountTargetId=t["MountTargetId"])[
            "SecurityGroups"] == [group["GroupId"]]
    # again: nothing written
    log = CallLog(clients)
    ensure_environment(clients, AwsSettings(), Needs(efs=True, run_id="r1"), ProvisionReport())
    assert log.mutating() == []


def test_doctor_reports_the_network_and_checks_efs_by_zone(clients: AwsClients) -> None:
    ec2 = clients.ec2
    subnets = sorted(ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"],
                     key=lambda s: s["AvailabilityZone"])
    vpc = subnets[0]["VpcId"]
    # a second subnet in zone a: it shares zone a's mount target (EFS allows one per zone)
    extra = ec2.create_subnet(VpcId=vpc, CidrBlock="172.31.200.0/24", AvailabilityZone="us-east-2a")["Subnet"]
    ec2.modify_subnet_attribute(SubnetId=extra["SubnetId"], MapPublicIpOnLaunch={"Value": True})
    ids = [s["SubnetId"] for s in subnets[:2]] + [extra["SubnetId"]]
    settings = AwsSettings(subnets=ids, efs=True)
    env = ensure_environment(clients, settings, Needs(efs=True))
    findings = dr.aws_checks(clients, settings)
    assert dr.worst(findings) == "ok", [f for f in findings if f.level != "ok"]
    assert len(clients.efs.describe_mount_targets(FileSystemId=env.efs_id)["MountTargets"]) == 2

    # zone b's mount target lost: an error naming the zone, whose fix names a subnet of it and corral's group
    (tb,) = [t for t in clients.efs.describe_mount_targets(FileSystemId=env.efs_id)["MountTargets"]
             if t["AvailabilityZoneName"] == "us-east-2b"]
    clients.efs.delete_mount_target(MountTargetId=tb["MountTargetId"])
    (efs,) = [f for f in dr.aws_checks(clients, settings) if f.check == "efs"]
    assert efs.level == "error" and "zone(s) us-east-2b" in efs.message and "us-east-2a" not in efs.message
    assert f"--subnet-id {subnets[1]['SubnetId']}" in efs.fix and EFS_GROUP in efs.fix
    ensure_environment(clients, settings, Needs(efs=True))  # the fix corral itself applies
    assert [f.level for f in dr.aws_checks(clients, settings) if f.check == "efs"] == ["ok"]

    # a mount target behind a group that does not admit the compute group
    other = ec2.create_security_group(GroupName="closed-nfs", Description="x", VpcId=vpc)["GroupId"]
    (ta, *_) = clients.efs.describe_mount_targets(FileSystemId=env.efs_id)["MountTargets"]
    clients.efs.modify_mount_target_security_groups(MountTargetId=ta["MountTargetId"], SecurityGroups=[other])
    (efs,) = [f for f in dr.aws_checks(clients, settings) if f.check == "efs"]
    assert efs.level == "error" and "admit no NFS" in efs.message and ta["MountTargetId"] in efs.message

    # the routes out removed: doctor reports each subnet as an error, with the fix
    main = _main_table(ec2, vpc)
    ec2.delete_route(RouteTableId=main, DestinationCidrBlock="0.0.0.0/0")
    net = [f for f in dr.aws_checks(clients, settings) if f.check == "network"]
    assert {f.subject for f in net} == set(ids) and all(f.level == "error" and "NAT gateway" in f.fix for f in net)
