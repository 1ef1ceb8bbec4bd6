"""``corral recipe ...``: write a starter workflow from a field's own inputs.

    corral recipe neuroconv conversion.yml -o workflow.yaml --raw s3://lab-raw/ephys --dandiset 000123
    corral recipe bids s3://bucket/dataset -o workflow.yaml --image bids/mriqc:24.0.2 --output s3://bucket/derivatives

The workflow goes to ``-o`` (or stdout); a one-line summary goes to stderr. The written workflow is
planned before it is written, so what the command writes always validates.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import click

from corral.errors import UsageError
from corral.recipes.templates import BidsStarter, NeuroconvStarter, bids_workflow, neuroconv_workflow


def _rel(target: str, out: Path | None) -> str:
    """``target`` as the written workflow will read it: relative to the workflow's folder."""
    if "://" in target:
        return target
    base = (out.parent if out else Path.cwd()).resolve()
    return Path(os.path.relpath(Path(target).resolve(), base)).as_posix()


def _finish(text: str, out: Path | None, force: bool, what: str) -> None:
    from corral.plan import make_plan
    from corral.spec import loads_workflow

    base = (out.parent if out else Path.cwd()).resolve()
    wf = loads_workflow(text, source=str(out or "<recipe>"), base_dir=base)
    plan = make_plan(wf)
    summary = f"{len(plan.items)} {what} × {len(wf.stages)} stages = {len(plan.tasks)} tasks"
    if out is None:
        sys.stdout.write(text)
        click.echo(f"corral: {summary}", err=True)
        return
    if out.exists() and not force:
        raise UsageError(f"{out} already exists", "pass --force to overwrite it, or choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    click.echo(f"corral: wrote {out}: {summary}", err=True)
    click.echo(f"next: corral plan {out}   (then: corral run {out})", err=True)


def _name(stem: str, prefix: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", f"{prefix}-{stem}").strip("-")[:63]
    return name if name[:1].isalpha() else f"w-{name}"[:63]


def register(cli: click.Group) -> None:
    @cli.group("recipe")
    def recipe() -> None:
        """Write a starter workflow from a NeuroConv spec or a BIDS dataset."""

    @recipe.command("neuroconv")
    @click.argument("conversion", type=click.Path(dir_okay=False))
    @click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path),
                  help="Write the workflow here (default: stdout).")
    @click.option("--raw", default="s3://my-bucket/raw", show_default=True,
                  help="Where the raw data lives (s3:// or any rclone remote); a session's files are "
                       "under <raw>/<its source folder>.")
    @click.option("--dandiset", default=None, help="Dandiset id to upload to (default: upload_to_dandiset of the spec).")
    @click.option("--instance", default="dandi", show_default=True, help="DANDI instance (dandi or dandi-sandbox).")
    @click.option("--dandi-secret", default="env:DANDI_API_KEY", show_default=True,
                  help="Secret reference for DANDI_API_KEY (env:VAR locally, a secret name on AWS).")
    @click.option("--image", default=NeuroconvStarter.image, show_default=True, help="Container image with neuroconv and dandi.")
    @click.option("--no-upload", is_flag=True, help="Leave out the DANDI upload stage.")
    @click.option("--name", default=None, help="Workflow name (default: from the spec's file name).")
    @click.option("--force", is_flag=True, help="Overwrite the output file.")
    def neuroconv_cmd(conversion: str, out: Path | None, raw: str, dandiset: str | None, instance: str,
                      dandi_secret: str, image: str, no_upload: bool, name: str | None, force: bool) -> None:
        """Starter workflow for a NeuroConv YAML conversion specification: per session,
        fetch (rclone) -> convert (neuroconv CLI) -> upload (dandi upload) -> cleanup."""
        from corral.recipes.neuroconv import load_conversion_spec, validate_conversion_spec

        located = load_conversion_spec(Path(conversion))
        validate_conversion_spec(located)
        spec_dandiset = located.data.get("upload_to_dandiset")
        dandiset = dandiset or (str(spec_dandiset) if spec_dandiset is not None else None)
        if not no_upload and not dandiset:
            raise UsageError(
                "no dandiset to upload to",
                "pass --dandiset 000123 (or put upload_to_dandiset in the spec), or --no-upload",
            )
        if dandiset and not re.fullmatch(r"\d{6}", dandiset):
            raise UsageError(f"dandiset {dandiset!r} is not a six-digit id", "e.g. --dandiset 000123")
        starter = NeuroconvStarter(
            name=name or _name(Path(conversion).stem, "neuroconv"), conversion=_rel(conversion, out),
            raw=raw.rstrip("/"), dandiset=None if no_upload else dandiset, instance=instance,
            dandi_secret=dandi_secret, image=image,
        )
        _finish(neuroconv_workflow(starter), out, force, "sessions")

    @recipe.command("bids")
    @click.argument("dataset")
    @click.option("-o", "--output", "out", type=click.Path(dir_okay=False, path_type=Path),
                  help="Write the workflow here (default: stdout).")
    @click.option("--image", required=True, help="The BIDS App's container image (e.g. bids/mriqc:24.0.2).")
    @click.option("--app", "app_cmd", default=None, help="The app's command inside the image (default: the image's name, e.g. mriqc).")
    @click.option("--results", default=None,
                  help="Where outputs go (s3://... or a folder); default: derivatives/<app> beside the workflow.")
    @click.option("--datatype", "datatypes", multiple=True, help="Only scans with this datatype (repeatable: dwi, anat, ...).")
    @click.option("--require", multiple=True, help="Only scans that have all these datatypes (repeatable).")
    @click.option("--gpus", default=0, show_default=True, type=click.IntRange(0, 16), help="GPUs for the app stage.")
    @click.option("--anonymous", is_flag=True, help="List an s3:// dataset without credentials (public buckets, e.g. OpenNeuro).")
    @click.option("--name", default=None, help="Workflow name (default: from the dataset's name).")
    @click.option("--force", is_flag=True, help="Overwrite the output file.")
    def bids_cmd(dataset: str, out: Path | None, image: str, app_cmd: str | None, results: str | None,
                 datatypes: tuple[str, ...], require: tuple[str, ...], gpus: int, anonymous: bool, name: str | None,
                 force: bool) -> None:
        """Starter workflow running a BIDS App per subject × session: pull -> app -> push -> cleanup."""
        app_name = re.sub(r"[^A-Za-z0-9_-]+", "-", image.split("/")[-1].split(":")[0]) or "app"
        stem = dataset.rstrip("/").rsplit("/", 1)[-1] or "dataset"
        starter = BidsStarter(
            name=name or _name(stem, "bids"), dataset=_rel(dataset, out), image=image, app=app_cmd,
            results=(results or f"derivatives/{app_name}").rstrip("/"), datatypes=list(datatypes),
            require=list(require), gpus=gpus, anonymous=anonymous,
        )
        _finish(bids_workflow(starter), out, force, "scans")
