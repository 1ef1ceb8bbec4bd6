"""Helpers for the provisioning tests: API-call recording and a per-service census of tagged things."""

from __future__ import annotations

from typing import Any

READ_PREFIXES = ("Describe", "List", "Get", "Head")


class CallLog:
    """Records every API call the clients make, with its parameters (botocore's
    ``before-parameter-build`` event, emitted once per call, before any request is sent)."""

    def __init__(self, clients: Any) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        clients.register_hook("before-parameter-build.*.*", self._record)

    def _record(self, model: Any, params: Any = None, **_: Any) -> None:
        self.calls.append((model.service_model.service_name, model.name, dict(params or {})))

    def clear(self) -> None:
        self.calls.clear()

    def names(self) -> list[str]:
        return [f"{s}.{n}" for s, n, _ in self.calls]

    def mutating(self) -> list[str]:
        """Every call that is not a read: Create*, Register*, Put*, Tag*, Attach*, Update*, …"""
        return [f"{s}.{n}" for s, n, _ in self.calls if not n.startswith(READ_PREFIXES)]

    def creates(self) -> list[str]:
        return [f"{s}.{n}" for s, n, _ in self.calls
                if n.startswith(("Create", "Register", "Put", "Attach", "Add", "Tag"))]


def _managed(tags: Any) -> bool:
    if isinstance(tags, dict):
        return tags.get("corral:managed") == "true"
    return any((t.get("Key") or t.get("key")) == "corral:managed" and (t.get("Value") or t.get("value")) == "true"
               for t in tags or [])


def managed_census(clients: Any) -> dict[str, list[str]]:
    """Every resource carrying corral:managed=true, service by service (what teardown must remove)."""
    out: dict[str, list[str]] = {}
    b = clients.batch
    out["compute-environments"] = [c["computeEnvironmentName"] for c in b.describe_compute_environments()[
        "computeEnvironments"] if c.get("status") != "DELETED" and _managed(c.get("tags"))]
    out["job-queues"] = [q["jobQueueName"] for q in b.describe_job_queues()["jobQueues"]
                         if q.get("status") != "DELETED" and _managed(q.get("tags"))]
    out["job-definitions"] = [d["jobDefinitionName"] for d in b.describe_job_definitions(status="ACTIVE")[
        "jobDefinitions"] if d.get("status") == "ACTIVE" and _managed(d.get("tags"))]
    iam = clients.iam
    out["roles"] = [r["RoleName"] for r in iam.list_roles()["Roles"]
                    if _managed(iam.list_role_tags(RoleName=r["RoleName"])["Tags"])]
    out["instance-profiles"] = [p["InstanceProfileName"] for p in iam.list_instance_profiles(PathPrefix="/corral/")[
        "InstanceProfiles"]]
    ddb = clients.dynamodb
    out["tables"] = [t for t in ddb.list_tables()["TableNames"] if _managed(ddb.list_tags_of_resource(
        ResourceArn=ddb.describe_table(TableName=t)["Table"]["TableArn"]).get("Tags", []))]
    logs = clients.logs
    out["log-groups"] = [g["logGroupName"] for g in logs.describe_log_groups()["logGroups"]
                         if _managed(logs.list_tags_log_group(logGroupName=g["logGroupName"]).get("tags", {}))]
    s3 = clients.s3
    buckets = []
    for bk in s3.list_buckets().get("Buckets", []):
        try:
            tags = s3.get_bucket_tagging(Bucket=bk["Name"])["TagSet"]
        except Exception:
            tags = []
        if _managed(tags):
            buckets.append(bk["Name"])
    out["buckets"] = buckets
    efs = clients.efs
    out["file-systems"] = [f["FileSystemId"] for f in efs.describe_file_systems()["FileSystems"]
                           if _managed(f.get("Tags"))]
    out["access-points"] = [a["AccessPointId"] for a in efs.describe_access_points()["AccessPoints"]
                            if _managed(a.get("Tags"))]
    out["launch-templates"] = [t["LaunchTemplateName"] for t in clients.ec2.describe_launch_templates()[
        "LaunchTemplates"] if _managed(t.get("Tags"))]
    ecr = clients.ecr
    out["ecr-repositories"] = [r["repositoryName"] for r in ecr.describe_repositories()["repositories"]
                               if _managed(ecr.list_tags_for_resource(resourceArn=r["repositoryArn"])["tags"])]
    sm = clients.secretsmanager
    out["secrets"] = [s["Name"] for s in sm.list_secrets()["SecretList"] if _managed(s.get("Tags"))]
    return {k: v for k, v in out.items() if v}
