"""``corral aws …``: set up and tear down the AWS Batch environment, push and list ECR images.

What people read goes to stderr; what scripts read (``--json``, an image URI) goes to stdout.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def _echo(text: str = "") -> None:
    click.echo(text, err=True)


def aws_options(f: F) -> F:
    f = click.option("--profile", default=None, help="AWS profile (default: AWS_PROFILE or the default profile).")(f)
    f = click.option("--region", default=None, help="AWS region (default: AWS_REGION or the profile's region).")(f)
    return f


def _clients(region: str | None, profile: str | None) -> Any:
    from corral.backends.aws_batch.client import AwsClients

    return AwsClients(region=region, profile=profile)


def _print_report(report: Any, verb: str = "") -> None:
    for title, items in (("created", report.created), ("updated", report.updated), ("found", report.found),
                         ("deleted", report.deleted), ("kept", report.kept)):
        for item in items:
            _echo(f"  {title:8} {item}")
    counts = ", ".join(f"{len(v)} {k}" for k, v in report.as_dict().items() if v)
    _echo(f"{verb}{counts or 'nothing to do'}")


def _settings_for(workflow: str | None, **overrides: Any) -> tuple[Any, Any]:
    """(AwsSettings, Needs): from a workflow file when given, then the command-line overrides."""
    from corral.backends.aws_batch.provision import Needs, needs_for
    from corral.spec import AwsSettings

    if workflow:
        from corral.plan import make_plan
        from corral.spec import load_workflow

        wf = load_workflow(workflow)
        plan = make_plan(wf)
        settings = wf.aws
        needs = needs_for(plan)
        from corral.routes import check_fits

        check_fits(plan, list(settings.instance_types))
    else:
        settings = AwsSettings()
        needs = Needs()
    update = {k: v for k, v in overrides.items() if v is not None and k in AwsSettings.model_fields}
    if update:
        settings = settings.model_copy(update=update)
    return settings, needs


def register(cli: click.Group) -> None:
    group = cli.commands.get("aws")
    if not isinstance(group, click.Group):
        group = click.Group("aws", help="Set up, inspect and tear down corral's AWS Batch environment.")
        cli.add_command(group)
    group.add_command(setup)
    group.add_command(teardown)
    group.add_command(image)


@click.command()
@aws_options
@click.option("--spot", is_flag=True, default=None, help="Add spot compute environments (tried first).")
@click.option("--gpu", is_flag=True, default=False, help="Also set up the GPU queue and environments.")
@click.option("--max-vcpus", type=click.IntRange(1, 100_000), default=None,
              help="Cap on the vCPUs each compute environment may run at once (default 256).")
@click.option("--disk", type=click.IntRange(1, 16 * 1024), default=None, metavar="GIB",
              help="Scratch disk per job in GiB (sizes the root volume by a launch template).")
@click.option("--efs", is_flag=True, default=False, help="Also set up the shared EFS workspace.")
@click.option("--fargate", is_flag=True, default=False,
              help="Also set up Fargate environments and a queue (for stages of up to 16 vCPUs, no GPUs).")
@click.option("--bucket", default=None, help="S3 bucket for run data (made when missing).")
@click.option("--workflow", "-w", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Set up what this workflow needs (its aws: settings, GPUs, disk, EFS, secrets).")
@click.option("--json", "as_json", is_flag=True, help="Print the environment as JSON on stdout.")
def setup(region: str | None, profile: str | None, spot: bool | None, gpu: bool, max_vcpus: int | None,
          disk: int | None, efs: bool, fargate: bool, bucket: str | None, workflow: str | None,
          as_json: bool) -> None:
    """Find or make everything corral needs on AWS Batch; prints what it made and found.

    Running it again makes nothing new. Everything it makes is tagged corral:managed=true.
    """
    from corral.backends.aws_batch.provision import ProvisionReport, ensure_environment

    settings, needs = _settings_for(workflow, region=region, profile=profile, spot=spot or None,
                                    max_vcpus=max_vcpus, bucket=bucket)
    needs.gpu = needs.gpu or gpu
    needs.efs = needs.efs or efs
    needs.fargate = needs.fargate or fargate
    needs.bucket = needs.bucket or bool(bucket)
    if disk:
        needs.max_disk_gib = max(disk, needs.max_disk_gib or 0)
    clients = _clients(settings.region, settings.profile)
    _echo(f"setting up corral on AWS Batch in {clients.region} ...")
    report = ProvisionReport()
    env = ensure_environment(clients, settings, needs, report)
    _print_report(report, "done: ")
    _echo(f"job queue: {env.job_queue}")
    if env.gpu_job_queue:
        _echo(f"GPU job queue: {env.gpu_job_queue}")
    if env.fargate_job_queue:
        _echo(f"Fargate job queue: {env.fargate_job_queue}")
    if as_json:
        click.echo(json.dumps({"environment": dataclasses.asdict(env), "report": report.as_dict()}, indent=2))


@click.command()
@aws_options
@click.option("--all", "everything", is_flag=True, help="Remove everything corral made in the region.")
@click.option("--run", "run_id", default=None,
              help="Remove what one run made (its data on EFS, EFS access point, secrets, staged data, roles).")
@click.option("--keep-data", is_flag=True, help="With --run: keep the run's data on EFS (remove only resources).")
@click.option("--timeout", type=click.FloatRange(min=1), default=1800, show_default=True, metavar="SECONDS",
              help="With --run: how long to wait for the job removing the run's EFS data.")
@click.option("--table", default=None, help="With --run: the state table the run is recorded in (default corral-state).")
@click.option("--force", is_flag=True, help="Go on even while jobs are in flight (the run's, or with --all any in "
              "corral's queues).")
@click.option("--purge", is_flag=True, help="With --all: also delete the state table, the EFS workspace, and "
              "buckets and ECR repositories that hold data.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON on stdout.")
def teardown(region: str | None, profile: str | None, everything: bool, run_id: str | None, keep_data: bool,
             timeout: float, table: str | None, force: bool, purge: bool, yes: bool, as_json: bool) -> None:
    """Remove what corral made (resources tagged corral:managed), and nothing else.

    With --run, the run's data on the EFS workspace goes first (a job runs `rm -rf` of the run's
    folder); when that job fails, the run's access point is kept so it can be tried again."""
    from corral.backends.aws_batch.provision import teardown as do_teardown
    from corral.errors import BackendError, UsageError

    if everything == bool(run_id):
        raise UsageError("say what to remove: --all or --run RUN_ID (one of them)",
                         "`corral aws teardown --run RUN` for one run's things, --all for everything")
    if keep_data and not run_id:
        raise UsageError("--keep-data goes with --run RUN_ID", "`corral aws teardown --run RUN --keep-data`")
    clients = _clients(region, profile)
    if run_id and not force:
        from corral.backends.aws_batch.run_data import still_running

        if still_running(clients, run_id, table=table):
            raise UsageError(
                f"run {run_id} still has jobs in flight; tearing it down now would pull its workspace from under them",
                f"`corral cancel {run_id} --backend aws` first (or wait for it), or add --force",
            )
    what = f"everything corral made in {clients.region}" if everything else f"what run {run_id} made"
    if run_id and not keep_data:
        what += ", including its data on EFS"
    if purge:
        what += ", including the state table, the EFS workspace, and buckets and image repositories that hold data"
    if everything and not force:
        from corral.backends.aws_batch.common import Ctx
        from corral.backends.aws_batch.provision import ProvisionReport
        from corral.backends.aws_batch.teardown import jobs_in_flight

        busy = jobs_in_flight(Ctx(clients=clients, report=ProvisionReport(), tags={}))
        if busy:
            what_busy = ", ".join(f"{n} {status} in {queue}" for queue, status, n in busy[:4])
            raise UsageError(f"corral's queues still have jobs in flight ({what_busy}); tearing down now would "
                             "kill them", "`corral cancel RUN --backend aws` for each run (or wait), or add --force")
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"refusing to remove {what} without confirmation", "add --yes")
        click.confirm(f"Remove {what}?", abort=True, err=True)
    data = None
    if run_id and not keep_data:
        from corral.backends.aws_batch.run_data import remove_run_data

        _echo(f"removing run {run_id}'s data on EFS (waiting up to {timeout:g}s for the job) ...")
        data = remove_run_data(clients, run_id, table=table, timeout=timeout)
        if data.failed:
            _echo(f"  failed   removing run {run_id}'s EFS data: {data.message}")
        else:
            _echo(f"  {'note' if data.status == 'skipped' else data.status:8} {data.message}")
    kept_why = None
    if data is not None and data.failed:
        kept_why = f"{data.access_point}: the run's data is still on EFS"
    report = do_teardown(clients, run_id=run_id, everything=everything, purge=purge, keep_access_point=kept_why,
                         force=True)  # in-flight jobs were checked above, before asking
    from corral.aws import forget_cached_environments

    forget_cached_environments()
    _print_report(report, "done: ")
    if as_json:
        out: dict[str, Any] = dict(report.as_dict())
        if data is not None:
            out["data"] = {"status": data.status, "message": data.message, "job_id": data.job_id}
        click.echo(json.dumps(out, indent=2))
    if data is not None and data.failed:
        raise BackendError(
            f"run {run_id}'s data on EFS was not removed ({data.message}); its access point is kept",
            f"see the job in the AWS Batch console (its log is in CloudWatch), then run "
            f"`corral aws teardown --run {run_id}` again (or add --keep-data to remove the rest, keeping the data)",
        )


@click.group()
def image() -> None:
    """Private container images in ECR (used in workflows as image: ecr://NAME:TAG)."""


@image.command("push")
@aws_options
@click.argument("image_ref", metavar="IMAGE")
@click.option("--repository", default=None, help="ECR repository name (default: the image's name).")
@click.option("--immutable", is_flag=True, help="Make the repository's tags immutable.")
@click.option("--engine", type=click.Choice(["docker", "podman"]), default=None,
              help="Container engine (default: the first that answers; or CORRAL_CONTAINER_ENGINE).")
def image_push(region: str | None, profile: str | None, image_ref: str, repository: str | None, immutable: bool,
               engine: str | None) -> None:
    """Push a local IMAGE to ECR (creating the repository); prints the image URI on stdout."""
    from corral.backends.aws_batch import ecr
    from corral.backends.aws_batch.provision import ProvisionReport

    clients = _clients(region, profile)
    report = ProvisionReport()
    uri = ecr.push(image_ref, clients, repository=repository, engine=engine, immutable=immutable, report=report)
    for item in report.created:
        _echo(f"  created  {item}")
    _echo(f"pushed {image_ref} → {uri}  (use it in a workflow as ecr://{uri.split('/', 1)[1]})")
    click.echo(uri)


@image.command("list")
@aws_options
@click.option("--all", "everything", is_flag=True, help="List every repository, not only corral's.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON on stdout.")
def image_list(region: str | None, profile: str | None, everything: bool, as_json: bool) -> None:
    """List corral's ECR repositories and their images."""
    from corral.backends.aws_batch import ecr

    repos = ecr.list_repositories(_clients(region, profile), everything=everything)
    if as_json:
        click.echo(json.dumps(repos, indent=2, default=str))
        return
    if not repos:
        _echo("no repositories (push one with `corral aws image push IMAGE`)")
        return
    for r in repos:
        click.echo(r["uri"])
        for i in r["images"]:
            tags = ",".join(i["tags"]) or "<untagged>"
            size = f"{i['size_bytes'] / 2**20:.0f} MiB" if i.get("size_bytes") else "-"
            click.echo(f"  {tags:30} {i['digest'][:19]:19}  {size:>9}  {i['pushed_at']}")
