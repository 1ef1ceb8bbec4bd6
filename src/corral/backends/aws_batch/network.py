"""Where Batch instances and EFS mount targets go: subnets and security groups.

Given in the settings → used as given (checked to exist, so a typo fails here and not as an
INVALID compute environment later). Otherwise → the region's default VPC: its default subnet
of each availability zone and its ``default`` security group (which lets members reach each
other, as EFS's NFS port needs). Nothing is hard-coded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.backends.aws_batch.client import aws_errors, error_code
from corral.backends.aws_batch.common import Ctx
from corral.errors import ProvisionError

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
            sg_ids = [groups[0]["GroupId"]]
    return Network(vpc_id=vpc_id, subnets=subnet_ids, security_groups=sg_ids, zones=zones)
