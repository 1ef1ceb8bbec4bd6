"""Where Batch instances and EFS mount targets go: subnets and security groups.

Given in the settings → used as given (checked to exist, so a typo fails here and not as an
INVALID compute environment later). Otherwise → the region's default VPC: its default subnet
of each availability zone and its ``default`` security group. Nothing is hard-coded.

:func:`check_network` is the preflight ``corral aws setup`` (refuses) and ``corral doctor
--backend aws`` (reports) share: every subnet used needs a way out — a route to an internet
gateway (with public IPs on launch) or a NAT gateway in its route table (or the VPC's main one),
or VPC endpoints for ECR (api and dkr), ECS (ecs, ecs-agent, ecs-telemetry), CloudWatch Logs and
S3 — and the security groups must allow egress (HTTPS; NFS too when EFS is used). Without that,
Batch instances never register with ECS and jobs sit RUNNABLE for ever.

EFS gets its own security group, ``corral-efs`` (tagged ``corral:managed``), allowing TCP 2049 from
the compute environments' groups only; the mount targets use it. corral does not rely on the
default group's self-reference rule, which many organisations remove (Security Hub EC2.2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.backends.aws_batch.client import aws_errors, error_code
from corral.backends.aws_batch.common import NAME, Ctx, is_managed, tag_list
from corral.errors import ProvisionError

EFS_GROUP = f"{NAME}-efs"
NFS_PORT = 2049
HTTPS_PORT = 443
# What an instance in a subnet without a route out needs to reach, as VPC endpoints: the ECS agent
# (ecs, ecs-agent, ecs-telemetry), image pulls (ecr.api, ecr.dkr and S3, where ECR keeps layers),
# and the awslogs driver (logs). Amazon ECS Developer Guide, "Amazon ECS interface VPC endpoints
# (AWS PrivateLink)"; Amazon ECR User Guide, "Amazon ECR interface VPC endpoints" (the S3 gateway
# endpoint is required for layers). Checked only against that documentation.
ENDPOINT_SERVICES = ("ecr.api", "ecr.dkr", "ecs", "ecs-agent", "ecs-telemetry", "logs", "s3")

_NO_DEFAULT_VPC_HINT = (
    "name them in the workflow: `aws: {subnets: [subnet-…], security_groups: [sg-…]}` "
    "(or create a default VPC: `aws ec2 create-default-vpc`)"
)


@dataclass
class Network:
    vpc_id: str
    subnets: list[str]
    security_groups: list[str]
    zones: dict[str, str] = field(default_factory=dict)  # subnet id → availability zone
    public_ip: dict[str, bool] = field(default_factory=dict)  # subnet id → MapPublicIpOnLaunch
    groups: list[dict[str, Any]] = field(default_factory=list)  # the security groups, as described
    described_subnets: list[dict[str, Any]] | None = None  # the subnets, as described

    def one_subnet_per_zone(self) -> list[str]:
        """EFS allows one mount target per zone: the first listed subnet of each zone."""
        seen: set[str] = set()
        out: list[str] = []
        for s in self.subnets:
            z = self.zones.get(s, s)
            if z not in seen:
                seen.add(z)
                out.append(s)
        return out


def discover(ctx: Ctx, subnets: list[str] | None = None, security_groups: list[str] | None = None) -> Network:
    ec2 = ctx.clients.ec2
    with aws_errors("find the network (subnets, security groups)"):
        if subnets:
            try:
                found = ec2.describe_subnets(SubnetIds=list(subnets))["Subnets"]
            except Exception as exc:
                if error_code(exc).startswith("InvalidSubnetID"):
                    raise ProvisionError(
                        f"subnet(s) {', '.join(subnets)} not found in {ctx.region}",
                        "check aws.subnets in the workflow (and the region)",
                    ) from None
                raise
            by_id = {s["SubnetId"]: s for s in found}
            vpcs = {s["VpcId"] for s in found}
            if len(vpcs) > 1:
                raise ProvisionError(
                    f"the subnets given are in {len(vpcs)} different VPCs ({', '.join(sorted(vpcs))})",
                    "list subnets of one VPC in aws.subnets",
                )
            vpc_id = vpcs.pop()
            subnet_ids = list(subnets)
            zones = {sid: by_id[sid]["AvailabilityZone"] for sid in subnet_ids if sid in by_id}
            public = {sid: bool(by_id[sid].get("MapPublicIpOnLaunch")) for sid in subnet_ids if sid in by_id}
            docs = [by_id[sid] for sid in subnet_ids if sid in by_id]
        else:
            vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
            if not vpcs:
                raise ProvisionError(f"no default VPC in {ctx.region} and no subnets given", _NO_DEFAULT_VPC_HINT)
            vpc_id = vpcs[0]["VpcId"]
            found = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]
            defaults = [s for s in found if s.get("DefaultForAz")]
            chosen = sorted(defaults or found, key=lambda s: (s["AvailabilityZone"], s["SubnetId"]))
            if not chosen:
                raise ProvisionError(f"the default VPC {vpc_id} in {ctx.region} has no subnets",
                                     _NO_DEFAULT_VPC_HINT)
            subnet_ids = [s["SubnetId"] for s in chosen]
            zones = {s["SubnetId"]: s["AvailabilityZone"] for s in chosen}
            public = {s["SubnetId"]: bool(s.get("MapPublicIpOnLaunch")) for s in chosen}
            docs = list(chosen)
        if security_groups:
            try:
                groups = ec2.describe_security_groups(GroupIds=list(security_groups))["SecurityGroups"]
            except Exception as exc:
                if error_code(exc).startswith("InvalidGroup"):
                    raise ProvisionError(
                        f"security group(s) {', '.join(security_groups)} not found in {ctx.region}",
                        "check aws.security_groups in the workflow (and the region)",
                    ) from None
                raise
            strays = sorted({g["GroupId"] for g in groups if g.get("VpcId") and g["VpcId"] != vpc_id})
            if strays:
                raise ProvisionError(
                    f"security group(s) {', '.join(strays)} are not in the subnets' VPC {vpc_id}",
                    "give security groups of the same VPC as the subnets",
                )
            sg_ids = list(security_groups)
        else:
            groups = ec2.describe_security_groups(
                Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "group-name", "Values": ["default"]}]
            )["SecurityGroups"]
            if not groups:
                raise ProvisionError(f"VPC {vpc_id} has no `default` security group",
                                     "name one in aws.security_groups")
            groups = groups[:1]
            sg_ids = [groups[0]["GroupId"]]
    return Network(vpc_id=vpc_id, subnets=subnet_ids, security_groups=sg_ids, zones=zones, public_ip=public,
                   groups=list(groups), described_subnets=docs)


# -- preflight ------------------------------------------------------------------------------------
@dataclass
class NetworkProblem:
    subject: str  # the subnet or security group at fault
    message: str
    fix: str

    def error(self) -> ProvisionError:
        return ProvisionError(self.message, self.fix)


def _route_table_of(subnet: str, tables: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The subnet's route table: the one associated with it, else the VPC's main one
    (Amazon VPC User Guide, "Route tables": a subnet without an explicit association uses the main)."""
    main = None
    for t in tables:
        for a in t.get("Associations") or []:
            if a.get("SubnetId") == subnet:
                return t
            if a.get("Main"):
                main = t
    return main


def _way_out(table: dict[str, Any] | None) -> str | None:
    """``igw``, ``nat`` or ``other`` (a transit gateway, a NAT instance…) for a default route, or None."""
    for r in (table or {}).get("Routes") or []:
        if r.get("State") == "blackhole" or r.get("DestinationCidrBlock") != "0.0.0.0/0":
            continue
        if str(r.get("GatewayId", "")).startswith("igw-"):
            return "igw"
        if r.get("NatGatewayId"):
            return "nat"
        if r.get("TransitGatewayId") or r.get("NetworkInterfaceId") or r.get("InstanceId"):
            return "other"
    return None


def _missing_endpoints(region: str, table: dict[str, Any] | None, endpoints: Sequence[dict[str, Any]]) -> list[str]:
    have: set[str] = set()
    table_id = (table or {}).get("RouteTableId")
    for e in endpoints:
        if e.get("State") not in (None, "available", "pending", "pendingAcceptance"):
            continue
        service = str(e.get("ServiceName", ""))
        prefix = f"com.amazonaws.{region}."
        if not service.startswith(prefix):
            continue
        short = service[len(prefix):]
        if e.get("VpcEndpointType") == "Gateway":
            if table_id in (e.get("RouteTableIds") or []):  # a gateway endpoint works through routes
                have.add(short)
        else:
            have.add(short)  # an interface endpoint with private DNS answers the whole VPC
    return [s for s in ENDPOINT_SERVICES if s not in have]


def _allows(rules: Sequence[dict[str, Any]], port: int) -> bool:
    for r in rules:
        proto = str(r.get("IpProtocol", ""))
        if proto == "-1" or (proto in ("tcp", "6") and int(r.get("FromPort", 0)) <= port <= int(r.get("ToPort", 65535))):
            if r.get("IpRanges") or r.get("Ipv6Ranges") or r.get("PrefixListIds") or r.get("UserIdGroupPairs"):
                return True
    return False


def check_network(ec2: Any, region: str, subnets: Sequence[str], security_groups: Sequence[str], *,
                  efs: bool = False, public_ip_from_job: bool = False,
                  described_subnets: Sequence[dict[str, Any]] | None = None,
                  described_groups: Sequence[dict[str, Any]] | None = None) -> list[NetworkProblem]:
    """What keeps instances (or Fargate tasks) in these subnets and groups from working; only reads.

    ``public_ip_from_job``: the jobs get a public IP themselves (Fargate's ``assignPublicIp``),
    so an internet gateway route is enough even where the subnet does not map public IPs.
    """
    problems: list[NetworkProblem] = []
    if not subnets:
        return problems
    with aws_errors("check the network (routes, VPC endpoints, security groups)"):
        described = list(described_subnets) if described_subnets is not None else \
            ec2.describe_subnets(SubnetIds=list(subnets))["Subnets"]
        vpcs = sorted({s["VpcId"] for s in described})
        tables: list[dict[str, Any]] = []
        endpoints: list[dict[str, Any]] = []
        for page in ec2.get_paginator("describe_route_tables").paginate(
            Filters=[{"Name": "vpc-id", "Values": vpcs}]
        ):
            tables += page.get("RouteTables", [])
        need_endpoints = False
        ways: dict[str, tuple[dict[str, Any] | None, str | None]] = {}
        for s in described:
            table = _route_table_of(s["SubnetId"], tables)
            way = _way_out(table)
            if way == "igw" and not (s.get("MapPublicIpOnLaunch") or public_ip_from_job):
                way = "igw-without-public-ip"
            ways[s["SubnetId"]] = (table, way)
            need_endpoints = need_endpoints or way in (None, "igw-without-public-ip")
        if need_endpoints:
            for page in ec2.get_paginator("describe_vpc_endpoints").paginate(
                Filters=[{"Name": "vpc-id", "Values": vpcs}]
            ):
                endpoints += page.get("VpcEndpoints", [])
        for sid in subnets:
            table, way = ways.get(sid, (None, None))
            if way in ("igw", "nat", "other"):
                continue
            missing = _missing_endpoints(region, table, endpoints)
            if not missing:
                continue
            rt = (table or {}).get("RouteTableId", "?")
            if way == "igw-without-public-ip":
                problems.append(NetworkProblem(
                    sid, f"subnet {sid} routes to an internet gateway but does not give instances a public IP, "
                    f"and its VPC lacks endpoints for {', '.join(missing)}: jobs would stay RUNNABLE",
                    f"`aws ec2 modify-subnet-attribute --subnet-id {sid} --map-public-ip-on-launch`, or use "
                    "private subnets with a NAT gateway in aws.subnets"))
            else:
                problems.append(NetworkProblem(
                    sid, f"subnet {sid} has no route out (route table {rt} has no 0.0.0.0/0 to an internet or "
                    f"NAT gateway) and its VPC lacks endpoints for {', '.join(missing)}: jobs would stay RUNNABLE",
                    f"add a route 0.0.0.0/0 → a NAT gateway to {rt} (`aws ec2 create-route --route-table-id {rt} "
                    "--destination-cidr-block 0.0.0.0/0 --nat-gateway-id nat-…`), or create VPC endpoints for "
                    f"{', '.join(missing)}, or name subnets that have a way out in aws.subnets"))
        if described_groups is not None:
            groups = list(described_groups)
        else:
            groups = ec2.describe_security_groups(GroupIds=list(security_groups))["SecurityGroups"] \
                if security_groups else []
    egress = [r for g in groups for r in g.get("IpPermissionsEgress") or []]
    names = ", ".join(security_groups)
    if groups and not _allows(egress, HTTPS_PORT):
        problems.append(NetworkProblem(
            names, f"security group(s) {names} allow no outbound HTTPS: instances cannot reach ECS, ECR, "
            "CloudWatch Logs or S3", f"allow egress on TCP 443 (`aws ec2 authorize-security-group-egress "
            f"--group-id {security_groups[0]} --protocol tcp --port 443 --cidr 0.0.0.0/0`), or name other "
            "groups in aws.security_groups"))
    if efs and groups and not _allows(egress, NFS_PORT):
        problems.append(NetworkProblem(
            names, f"security group(s) {names} allow no outbound NFS (TCP {NFS_PORT}): jobs cannot mount EFS",
            f"allow egress on TCP {NFS_PORT} to the `{EFS_GROUP}` group (`aws ec2 authorize-security-group-egress "
            f"--group-id {security_groups[0]} --protocol tcp --port {NFS_PORT} --source-group <{EFS_GROUP}>`)"))
    return problems


def preflight(ctx: Ctx, net: Network, *, efs: bool = False, public_ip_from_job: bool = False) -> None:
    """Refuse (one line naming the subnet or group, and the fix) a network jobs could not work in."""
    problems = check_network(ctx.clients.ec2, ctx.region, net.subnets, net.security_groups, efs=efs,
                             public_ip_from_job=public_ip_from_job, described_subnets=net.described_subnets,
                             described_groups=net.groups or None)
    if problems:
        raise problems[0].error()


# -- EFS's security group -------------------------------------------------------------------------
def nfs_sources(group: dict[str, Any]) -> set[str]:
    """The security groups a group admits on TCP 2049."""
    out: set[str] = set()
    for r in group.get("IpPermissions") or []:
        proto = str(r.get("IpProtocol", ""))
        if proto == "-1" or (proto in ("tcp", "6") and int(r.get("FromPort", 0)) <= NFS_PORT
                             <= int(r.get("ToPort", 65535))):
            out |= {p["GroupId"] for p in r.get("UserIdGroupPairs") or [] if p.get("GroupId")}
    return out


def ensure_efs_group(ctx: Ctx, net: Network) -> str:
    """``corral-efs`` in the network's VPC: TCP 2049 in from the compute groups, nothing else."""
    ec2 = ctx.clients.ec2
    with aws_errors(f"set up security group {EFS_GROUP}"):
        found = ec2.describe_security_groups(Filters=[
            {"Name": "vpc-id", "Values": [net.vpc_id]}, {"Name": "group-name", "Values": [EFS_GROUP]},
        ])["SecurityGroups"]
        if found and not is_managed(found[0].get("Tags")):
            raise ProvisionError(f"security group {EFS_GROUP} ({found[0]['GroupId']}) in {net.vpc_id} is not "
                                 "corral's (no corral:managed tag)", "rename or remove it; corral makes its own")
        if found:
            group = found[0]
            ctx.found("security-group", f"{EFS_GROUP} ({group['GroupId']})")
        else:
            gid = ec2.create_security_group(
                GroupName=EFS_GROUP, VpcId=net.vpc_id,
                Description="corral: NFS (TCP 2049) to EFS mount targets from corral's compute environments",
                TagSpecifications=[{"ResourceType": "security-group", "Tags": tag_list({**ctx.tags, "Name": EFS_GROUP})}],
            )["GroupId"]
            ctx.created("security-group", f"{EFS_GROUP} ({gid})")
            group = {"GroupId": gid, "IpPermissions": []}
            # A mount target only answers; its group needs no egress (security groups are stateful).
            try:
                ec2.revoke_security_group_egress(GroupId=gid, IpPermissions=[
                    {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
            except Exception as exc:
                if not error_code(exc).startswith("InvalidPermission"):
                    raise
        missing = [g for g in net.security_groups if g not in nfs_sources(group)]
        if missing:
            ec2.authorize_security_group_ingress(GroupId=group["GroupId"], IpPermissions=[{
                "IpProtocol": "tcp", "FromPort": NFS_PORT, "ToPort": NFS_PORT,
                "UserIdGroupPairs": [{"GroupId": g, "Description": "corral compute environments"} for g in missing],
            }])
            if found:
                ctx.updated("security-group", f"{EFS_GROUP} (NFS from {', '.join(missing)})")
    return str(group["GroupId"])
