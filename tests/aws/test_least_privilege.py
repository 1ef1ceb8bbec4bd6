"""Per-run least privilege on AWS (issue 13 "Reach beyond a run"; issue 12: restrict_readers, EFS policy).

Two runs of one workflow go through ``corral.api.run`` against moto. moto stores policies but does
not evaluate them as AWS does, so every "may" and "may not" below is asked of the evaluator in
``tests/policy_eval.py`` (AWS's single-account evaluation logic for the subset corral writes) over
the documents moto holds: each run's job and execution roles' inline policies, the secret's
resource policy, the EFS file-system policy and the bucket's TLS-only policy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError
from moto_server import default_vpc_as_on_aws, reset
from policy_eval import ALLOW, DENY, Request, decide

from corral.backends.aws_batch import iam as iam_mod
from corral.backends.aws_batch import storage
from corral.backends.aws_batch.backend import AwsBatchBackend
from corral.backends.aws_batch.client import AwsClients
from corral.backends.aws_batch.common import Ctx
from corral.backends.aws_batch.provision import ProvisionReport, teardown
from corral.backends.aws_batch.waiting import Poller
from corral.backends.base import RunOptions
from corral.errors import ProvisionError
from corral.spec import loads_workflow

pytestmark = pytest.mark.aws

ACCOUNT, REGION = "123456789012", "us-east-2"
RAW, RESULTS = "lp-raw", "lp-results"
TLS = {"aws:SecureTransport": "true"}
NFS = {"aws:SecureTransport": "true", "elasticfilesystem:AccessedViaMountTarget": "true"}

WORKFLOW = f"""
name: lp
items: [{{s: s1}}, {{s: s2}}]
stages:
  - {{name: fetch, from: 'local/{{s}}', to: 'workspace://raw/{{s}}'}}
  - name: convert
    needs: [fetch]
    image: 'public.ecr.aws/docker/library/alpine:3.20'
    command: "ls {{workdir}}/raw/{{s}}"
    inputs: ['s3://{RAW}/sessions/{{s}}/']
    outputs: ['s3://{RESULTS}/out/{{run}}/{{s}}.nwb']
    secrets: {{DB_PASSWORD: 'aws:lab/db'}}
  - {{name: vault, needs: [convert], from: 'vault:{{s}}', to: 's3://{RESULTS}/vault/{{run}}/{{s}}'}}
"""


def _bucket(clients: AwsClients, name: str) -> None:
    clients.s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": clients.region})


def _doc(x: Any) -> dict[str, Any]:
    return json.loads(x) if isinstance(x, str) else x


def _inline(clients: AwsClients, role_arn: str) -> list[dict[str, Any]]:
    name = role_arn.rsplit("/", 1)[1]
    return [_doc(clients.iam.get_role_policy(RoleName=name, PolicyName=p)["PolicyDocument"])
            for p in clients.iam.list_role_policies(RoleName=name)["PolicyNames"]]


class Run:
    """What one run's record and AWS hold about it."""

    def __init__(self, clients: AwsClients, run_id: str, options: dict[str, Any]) -> None:
        aws = options["aws_batch"]
        self.id = run_id
        self.job_role, self.exec_role = aws["job_role_arn"], aws["execution_role_arn"]
        self.fs = f"arn:aws:elasticfilesystem:{REGION}:{ACCOUNT}:file-system/{aws['efs_id']}"
        self.ap_id = aws["efs_access_point"]
        self.ap = f"arn:aws:elasticfilesystem:{REGION}:{ACCOUNT}:access-point/{self.ap_id}"
        staged = aws["staged"]  # s3://bucket/corral/staged/<run>/
        self.bucket, self.staged = staged.split("/")[2], staged.split("/", 3)[3]
        self.job = _inline(clients, self.job_role)
        self.exe = _inline(clients, self.exec_role)
        self.secret = clients.secretsmanager.describe_secret(SecretId=f"corral/{run_id}/rclone")["ARN"]
        self.job_definitions: list[dict[str, Any]] = []
        self.role_tags: dict[str, str] = {}
        self.fs_policy: dict[str, Any] = {}
        self.access_points: dict[str, dict[str, Any]] = {}
        self.teardown_report: Any = None
        self.roles_after_teardown: set[str] = set()
        self.definitions_before: list[str] = []  # ACTIVE job definitions naming the run's job role
        self.definitions_after: list[str] = []
        self.secret_policy = _doc(clients.secretsmanager.get_resource_policy(SecretId=self.secret)["ResourcePolicy"])


@pytest.fixture(scope="module")
def two_runs(moto_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AwsClients, Run, Run]]:
    """Two runs of one workflow through ``corral.api.run``, made once for this module: what they
    left in AWS is read into :class:`Run` (pure data), then run A is torn down."""
    import corral.api as api

    tmp_path = tmp_path_factory.mktemp("least-privilege")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
                     "AWS_REGION": REGION, "AWS_ENDPOINT_URL": moto_url, "CORRAL_HOME": str(tmp_path / "home"),
                     "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                     "AWS_EC2_METADATA_DISABLED": "true", "RCLONE_CONFIG": str(tmp_path / "rclone.conf")}.items():
            mp.setenv(k, v)
        for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(var, raising=False)
        default_vpc_as_on_aws(moto_url)  # an internet gateway and route, as AWS's default VPC has
        try:
            for s in ("s1", "s2"):
                (tmp_path / "local" / s).mkdir(parents=True)
                (tmp_path / "local" / s / "rec.bin").write_bytes(b"raw " + s.encode())
            (tmp_path / "rclone.conf").write_text(f"[vault]\ntype = alias\nremote = {tmp_path / 'local'}\n")
            clients = AwsClients()
            for b in (RAW, RESULTS):
                _bucket(clients, b)
            clients.secretsmanager.create_secret(Name="lab/db", SecretString="not-a-real-password")
            wf = loads_workflow(WORKFLOW, base_dir=tmp_path)
            runs = []
            for _ in range(2):
                rec = api.run(wf, backend="aws", options=RunOptions(wait=False),
                              backend_impl=AwsBatchBackend(clients, wf.aws, say=lambda _m: None))
                store = api.open_store("aws", wf)
                run = Run(clients, rec.run_id, store.get_run(rec.run_id).options)
                parents = sorted({t.external_id.split(":")[0] for t in store.get_tasks(rec.run_id)})
                defs = {j["jobDefinition"] for j in clients.batch.describe_jobs(jobs=parents)["jobs"]}
                run.job_definitions = [clients.batch.describe_job_definitions(jobDefinitions=[d])["jobDefinitions"][0]
                                       for d in sorted(defs)]
                run.role_tags = {t["Key"]: t["Value"] for t in clients.iam.list_role_tags(
                    RoleName=run.job_role.rsplit("/", 1)[1])["Tags"]}
                runs.append(run)
            a, b = runs
            fs_id = a.fs.rsplit("/", 1)[1]
            a.fs_policy = _doc(clients.efs.describe_file_system_policy(FileSystemId=fs_id)["Policy"])
            a.access_points = {ap["AccessPointId"]: ap
                               for ap in clients.efs.describe_access_points(FileSystemId=fs_id)["AccessPoints"]}
            def definitions_naming(role: str) -> list[str]:
                return [d["jobDefinitionArn"] for page in clients.batch.get_paginator("describe_job_definitions")
                        .paginate(status="ACTIVE") for d in page["jobDefinitions"]
                        if d.get("status") == "ACTIVE"
                        and (d.get("containerProperties") or {}).get("jobRoleArn") == role]

            a.definitions_before = definitions_naming(a.job_role)
            a.teardown_report = teardown(clients, run_id=a.id)
            a.definitions_after = definitions_naming(a.job_role)
            b.definitions_after = definitions_naming(b.job_role)
            a.roles_after_teardown = {r["RoleName"] for r in clients.iam.list_roles(PathPrefix="/corral/")["Roles"]}
            yield clients, a, b
        finally:
            reset(moto_url)


def _s3(action: str, bucket: str, key: str | None = None, **ctx: str) -> Request:
    return Request(action, f"arn:aws:s3:::{bucket}" + (f"/{key}" if key is not None else ""),
                   context={**TLS, **ctx})


def test_each_run_has_its_own_job_role_tagged_with_the_run(two_runs: tuple[AwsClients, Run, Run]) -> None:
    _, a, b = two_runs
    assert a.job_role != b.job_role
    for run in (a, b):
        tags = run.role_tags
        assert tags["corral:run"] == run.id and tags["corral:managed"] == "true"
        assert len(run.job_definitions) == 3  # one per stage (fetch, vault, convert): each holds its own script
        # every job of the run runs as the run's role and mounts the workspace through its access point
        assert {d["containerProperties"]["jobRoleArn"] for d in run.job_definitions} == {run.job_role}
        for d in run.job_definitions:
            (vol,) = d["containerProperties"]["volumes"]
            assert vol["efsVolumeConfiguration"]["authorizationConfig"] == {"accessPointId": run.ap_id, "iam": "ENABLED"}
            assert vol["efsVolumeConfiguration"]["transitEncryption"] == "ENABLED"


def test_the_job_role_reaches_its_runs_data_outputs_and_workspace(two_runs: tuple[AwsClients, Run, Run]) -> None:
    _, a, b = two_runs
    job = a.job
    # What the run's jobs do: read its staged sources and its inputs, write (also multipart) its outputs.
    for req in [
        _s3("s3:GetObject", a.bucket, f"{a.staged}0f1e2d3c4b5a/s1/rec.bin"),
        _s3("s3:GetObject", RAW, "sessions/s1/ap.bin"),
        _s3("s3:PutObject", RESULTS, f"out/{a.id}/s1.nwb"),
        _s3("s3:AbortMultipartUpload", RESULTS, f"out/{a.id}/s1.nwb"),
        _s3("s3:PutObject", RESULTS, f"vault/{a.id}/s1/rec.bin"),
        _s3("s3:ListBucket", RESULTS, **{"s3:prefix": f"out/{a.id}/"}),
        _s3("s3:ListBucket", a.bucket, **{"s3:prefix": a.staged}),
        Request("elasticfilesystem:ClientMount", a.fs, a.job_role, {**NFS, "elasticfilesystem:AccessPointArn": a.ap}),
        Request("elasticfilesystem:ClientWrite", a.fs, a.job_role, {**NFS, "elasticfilesystem:AccessPointArn": a.ap}),
    ]:
        resource = [storage.file_system_policy(_ctx_for_docs(), a.fs.rsplit("/", 1)[1])] if "elasticfilesystem" in req.action else []
        assert decide(req, job, resource) == ALLOW, req


def test_the_job_role_reaches_nothing_of_another_run_nor_the_state_table(two_runs: tuple[AwsClients, Run, Run]) -> None:
    _, a, b = two_runs
    for req in [
        _s3("s3:GetObject", b.bucket, f"{b.staged}0f1e2d3c4b5a/s1/rec.bin"),  # another run's staged data
        _s3("s3:PutObject", a.bucket, f"{a.staged}x"),  # its own staged copies are read-only
        _s3("s3:DeleteObject", a.bucket, f"{a.staged}x"),
        _s3("s3:GetObject", a.bucket, "corral/other/thing"),  # the rest of corral's bucket
        _s3("s3:PutObject", RESULTS, f"out/{b.id}/s1.nwb"),  # another run's outputs
        _s3("s3:GetObject", RESULTS, f"vault/{b.id}/s1/rec.bin"),
        _s3("s3:ListBucket", RESULTS, **{"s3:prefix": f"out/{b.id}/"}),
        _s3("s3:ListBucket", a.bucket, **{"s3:prefix": b.staged}),
        _s3("s3:PutObject", RAW, "sessions/s1/ap.bin"),  # inputs are read-only
        Request("dynamodb:GetItem", f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/corral-state"),
        Request("dynamodb:Query", f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/corral-state"),
        Request("dynamodb:PutItem", f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/corral-state"),
        Request("secretsmanager:GetSecretValue", a.secret),  # ECS hands secrets over with the execution role
        Request("secretsmanager:GetSecretValue", f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:lab/db-AbCdEf"),
        Request("logs:PutLogEvents", f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/aws/batch/corral:log-stream:x"),
    ]:
        assert decide(req, a.job) != ALLOW, req
    fs_policy = [storage.file_system_policy(_ctx_for_docs(), a.fs.rsplit("/", 1)[1])]
    mount = "elasticfilesystem:ClientMount"
    assert decide(Request(mount, a.fs, a.job_role, {**NFS, "elasticfilesystem:AccessPointArn": b.ap}),
                  a.job, fs_policy) != ALLOW  # another run's access point
    assert decide(Request(mount, b.fs, b.job_role, {**NFS, "elasticfilesystem:AccessPointArn": a.ap}),
                  b.job, fs_policy) != ALLOW
    assert decide(Request(mount, a.fs, a.job_role, NFS), a.job, fs_policy) == DENY  # the whole file system
    assert decide(Request("elasticfilesystem:ClientRootAccess", a.fs, a.job_role,
                          {**NFS, "elasticfilesystem:AccessPointArn": a.ap}), a.job, fs_policy) != ALLOW
    # Only these services at all, and only the run's resources (a wildcard would show up here).
    resources = {r for doc in a.job for st in doc["Statement"]
                 for r in ([st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"])}
    allowed_prefixes = (f"arn:aws:s3:::{a.bucket}/{a.staged}", f"arn:aws:s3:::{RAW}/sessions/",
                        f"arn:aws:s3:::{RESULTS}/out/{a.id}/", f"arn:aws:s3:::{RESULTS}/vault/{a.id}/", a.fs)
    assert all(r.startswith(allowed_prefixes) or r in {f"arn:aws:s3:::{x}" for x in (a.bucket, RAW, RESULTS)}
               for r in resources), resources
    actions = {x for doc in a.job for st in doc["Statement"] for x in st["Action"]}
    assert {x.split(":")[0] for x in actions} <= {"s3", "elasticfilesystem"}


def test_secrets_only_the_runs_execution_role_reads(two_runs: tuple[AwsClients, Run, Run]) -> None:
    _, a, b = two_runs
    user_secret = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:lab/db-AbCdEf"
    get = "secretsmanager:GetSecretValue"
    # The execution role: the stage's secret and the run's own rclone secret (its resource policy too).
    assert decide(Request(get, user_secret, a.exec_role), a.exe) == ALLOW
    assert decide(Request(get, a.secret, a.exec_role), a.exe, [a.secret_policy]) == ALLOW
    assert decide(Request(get, f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:lab/other-AbCdEf",
                          a.exec_role), a.exe) != ALLOW  # a secret no stage names
    # Another run's execution role, and an administrator allowed everything, are denied by the policy.
    assert decide(Request(get, a.secret, b.exec_role), b.exe, [a.secret_policy]) != ALLOW
    admin = [{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "secretsmanager:*", "Resource": "*"}]}]
    assert decide(Request(get, a.secret, f"arn:aws:iam::{ACCOUNT}:role/Admin"), admin, [a.secret_policy]) == DENY
    assert a.exec_role != b.exec_role  # each reads its own run's secret
    st = a.secret_policy["Statement"][0]
    assert st["Effect"] == "Deny" and a.exec_role in st["Condition"]["StringNotEquals"]["aws:PrincipalArn"]


def test_efs_file_system_policy_and_access_points(two_runs: tuple[AwsClients, Run, Run]) -> None:
    _, a, b = two_runs
    fs_id = a.fs.rsplit("/", 1)[1]
    stored = a.fs_policy
    assert stored == storage.file_system_policy(_ctx_for_docs(), fs_id)
    mount = "elasticfilesystem:ClientMount"
    through_a = {**NFS, "elasticfilesystem:AccessPointArn": a.ap}
    anyone = [{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "elasticfilesystem:*", "Resource": "*"}]}]
    other_role = f"arn:aws:iam::{ACCOUNT}:role/lab-notebook"
    assert decide(Request(mount, a.fs, other_role, through_a), anyone, [stored]) == DENY  # not corral's role
    assert decide(Request(mount, a.fs, None, through_a), [], [stored]) != ALLOW  # anonymous NFS client
    assert decide(Request(mount, a.fs, a.job_role, {**through_a, "aws:SecureTransport": "false"}),
                  a.job, [stored]) == DENY  # no TLS
    assert decide(Request(mount, a.fs, a.job_role,
                          {**through_a, "elasticfilesystem:AccessedViaMountTarget": "false"}), a.job, [stored]) == DENY
    assert decide(Request(mount, a.fs, a.job_role, through_a), a.job, [stored]) == ALLOW
    # Access points: a POSIX user, a 0755 root of the run's own.
    aps = a.access_points
    for run in (a, b):
        ap = aps[run.ap_id]
        assert ap["PosixUser"]["Uid"] == storage.EFS_UID == 1000 and ap["PosixUser"]["Gid"] == 1000
        assert ap["RootDirectory"]["Path"] == f"/runs/{run.id}"
        assert ap["RootDirectory"]["CreationInfo"] == {"OwnerUid": 1000, "OwnerGid": 1000, "Permissions": "0755"}


def test_teardown_of_a_run_removes_its_roles_and_leaves_the_other_run(two_runs: tuple[AwsClients, Run, Run]) -> None:
    _, a, b = two_runs
    report, names = a.teardown_report, a.roles_after_teardown
    for role in (a.job_role, a.exec_role):
        assert role.rsplit("/", 1)[1] not in names and f"role {role.rsplit('/', 1)[1]}" in report.deleted
    assert {b.job_role.rsplit("/", 1)[1], b.exec_role.rsplit("/", 1)[1]} <= names
    # the run's own job definitions (they name its job role) are deregistered; the other run's stay
    assert a.definitions_before and a.definitions_after == []
    assert b.definitions_after


# -- the bucket ------------------------------------------------------------------------------------
def _ctx(clients: AwsClients) -> Ctx:
    return Ctx(clients=clients, report=ProvisionReport(), tags={"corral:managed": "true"})


class _DocsClients:
    region = REGION

    def account_id(self) -> str:
        return ACCOUNT

    def partition(self) -> str:
        return "aws"


def _ctx_for_docs() -> Ctx:
    return Ctx(clients=_DocsClients(), report=ProvisionReport(), tags={})  # type: ignore[arg-type]


def test_bucket_corral_creates_is_tls_only_encrypted_and_private(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clients = AwsClients()
    monkeypatch.setattr(storage, "speaks_tls", lambda _s3: True)  # as on AWS (moto's endpoint is http)
    ctx = _ctx(clients)
    name = storage.ensure_bucket(ctx, "lp-tls")
    s3 = clients.s3
    policy = _doc(s3.get_bucket_policy(Bucket=name)["Policy"])
    assert policy == storage.tls_only_bucket_policy(ctx, name)
    rules = s3.get_bucket_encryption(Bucket=name)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert all(s3.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"].values())
    anything = [{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}]
    for action, key in (("s3:GetObject", "k"), ("s3:PutObject", "k"), ("s3:ListBucket", None)):
        plain = _s3(action, name, key, **{"aws:SecureTransport": "false"})
        assert decide(plain, anything, [policy]) == DENY
        assert decide(_s3(action, name, key), anything, [policy]) == ALLOW


def test_bucket_policy_added_to_corrals_old_bucket_but_never_to_a_users(aws: str, monkeypatch: pytest.MonkeyPatch) -> None:
    clients = AwsClients()
    s3 = clients.s3
    ctx = _ctx(clients)
    storage.ensure_bucket(ctx, "lp-plain")  # over moto's plain http: no TLS-only policy, and it says so
    assert any("lp-plain" in k and "plain http" in k for k in ctx.report.kept)
    with pytest.raises(ClientError):
        s3.get_bucket_policy(Bucket="lp-plain")
    _bucket(clients, "lp-users")
    monkeypatch.setattr(storage, "speaks_tls", lambda _s3: True)
    again = _ctx(clients)
    storage.ensure_bucket(again, "lp-plain")  # corral's (tagged), without a policy: gets it
    storage.ensure_bucket(again, "lp-users")  # the user's: left as it is
    assert again.report.updated == ["s3-bucket-policy lp-plain (TLS only)"]
    with pytest.raises(ClientError):
        s3.get_bucket_policy(Bucket="lp-users")


# -- IAM quota and eventual consistency (a fake of the IAM seam) ----------------------------------
class _FakeIam:
    def __init__(self, *, invisible_for: int = 0, limit: bool = False) -> None:
        self.invisible_for, self.limit = invisible_for, limit
        self.made = False
        self.gets = 0

    @staticmethod
    def _err(code: str, op: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code}}, op)

    def get_role(self, RoleName: str) -> dict[str, Any]:  # noqa: N803
        self.gets += 1
        if not self.made or self.gets <= 1 + self.invisible_for:  # the first look is before creating
            raise self._err("NoSuchEntity", "GetRole")
        return {"Role": {"Arn": f"arn:aws:iam::{ACCOUNT}:role/corral/{RoleName}"}}

    def get_role_policy(self, RoleName: str, PolicyName: str) -> dict[str, Any]:  # noqa: N803
        return {"PolicyDocument": {}}

    def create_role(self, **kw: Any) -> dict[str, Any]:
        if self.limit:
            raise self._err("LimitExceeded", "CreateRole")
        self.made = True
        return {"Role": {"Arn": f"arn:aws:iam::{ACCOUNT}:role/corral/{kw['RoleName']}"}}

    def put_role_policy(self, **kw: Any) -> None:
        pass


class _FakeClients(_DocsClients):
    def __init__(self, iam: _FakeIam) -> None:
        self.iam = iam


def _fake_ctx(iam: _FakeIam, slept: list[float]) -> Ctx:
    clock = [0.0]

    def sleep(s: float) -> None:
        slept.append(s)
        clock[0] += s

    return Ctx(clients=_FakeClients(iam), report=ProvisionReport(), tags={},  # type: ignore[arg-type]
               poller=Poller(sleep=sleep, clock=lambda: clock[0]))


def test_a_new_role_is_polled_until_iam_shows_it() -> None:
    iam, slept = _FakeIam(invisible_for=3), []
    arn = iam_mod.ensure_role(_fake_ctx(iam, slept), "corral-job-x", {"Version": "2012-10-17", "Statement": []},
                              description="d", inline={"Version": "2012-10-17", "Statement": []})
    assert arn.endswith("/corral-job-x") and len(slept) == 3  # polled, with backoff, not one fixed sleep
    assert slept == sorted(slept) and slept[0] < slept[-1]
    never, slept = _FakeIam(invisible_for=10**6), []
    with pytest.raises(ProvisionError, match="IAM role corral-job-x to become visible"):
        iam_mod.ensure_role(_fake_ctx(never, slept), "corral-job-x", {}, description="d")
    assert sum(slept) <= iam_mod.ROLE_VISIBLE_TIMEOUT


def test_the_role_quota_ends_in_one_line() -> None:
    with pytest.raises(ProvisionError) as err:
        iam_mod.ensure_role(_fake_ctx(_FakeIam(limit=True), []), "corral-job-x", {}, description="d")
    line = err.value.one_line()
    assert "quota" in line and "\n" not in line and "teardown --run" in (err.value.hint or "")

