"""Starter workflows written by ``corral recipe ...`` (text, so they keep their comments)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field


def _q(value: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(value)


@dataclass
class NeuroconvStarter:
    name: str
    conversion: str  # path of the conversion spec, as the workflow reads it
    raw: str = "s3://my-bucket/raw"
    dandiset: str | None = None  # None: no upload stage
    instance: str = "dandi"
    dandi_secret: str = "env:DANDI_API_KEY"
    image: str = "ghcr.io/catalystneuro/neuroconv:latest"


def neuroconv_workflow(s: NeuroconvStarter) -> str:
    from corral.recipes.neuroconv import VERSION_GUARD

    upload = ""
    cleanup_needs = "convert"
    dandiset_item = ""
    if s.dandiset:
        cleanup_needs = "upload"
        dandiset_item = f"\n  dandiset: {_q(s.dandiset)}   # sessions are checked for DANDI names before anything runs"
        upload = f"""
  # DANDI: download the dandiset's metadata, put this session's file where `dandi organize` would
  # (dandi_path: sub-<subject>/sub-<subject>_ses-<session>[_desc-<name>].nwb, unique per session,
  # checked before anything runs), upload that one file.
  - name: upload
    needs: [convert]
    image: {_q(s.image)}
    secrets:
      DANDI_API_KEY: {_q(s.dandi_secret)}   # on AWS: the name of a Secrets Manager secret
    retries: 3
    command: >-
      set -e;
      d={{workdir}}/dandi/{{stem}}; rm -rf "$d"; mkdir -p "$d"; cd "$d";
      dandi download --download dandiset.yaml DANDI:{s.dandiset}/draft -i {s.instance};
      cd {s.dandiset}; mkdir -p "$(dirname {{dandi_path}})";
      cp {{workdir}}/nwb/{{stem}}/{{nwbfile_name}} {{dandi_path}};
      dandi upload -i {s.instance} {{dandi_path}}
"""
    return f"""# Written by `corral recipe neuroconv`: a starting point, edit freely.
# One chain of tasks per session of {s.conversion}:
#   fetch (rclone) -> convert (neuroconv CLI) -> {"upload (dandi upload) -> " if s.dandiset else ""}cleanup
# Before `corral run`: check `from:` below (where the raw data is: a session's files are fetched from
# <raw>/{{source_dir}}, and only them){", and export DANDI_API_KEY" if s.dandiset else ""}.
name: {s.name}
defaults:
  resources: {{vcpus: 2, memory: 8GiB, disk: 100GiB}}
  retries: 1
  timeout: 12h

items:
  neuroconv: {_q(s.conversion)}   # each item carries its single-session spec (spec_json){dandiset_item}

stages:
  # Exactly the session's files (and their same-stem sidecars, x.meta beside x.bin), wherever they
  # sit, into a data folder of the session's own.
  - name: fetch
    from: {_q(s.raw + "/{source_dir}")}
    to: "workspace://data/{{stem}}/{{source_dir}}"
    filters: ["+ {{source_filter}}", "- *"]

  # The image's NeuroConv must be >= 0.10.2 (the first command refuses an older one); a missing
  # NWB file fails the task.
  - name: convert
    needs: [fetch]
    image: {_q(s.image)}
    outputs: ["workspace://nwb/{{stem}}/{{nwbfile_name}}"]
    command: >-
      set -e;
      {VERSION_GUARD};
      mkdir -p {{workdir}}/specs {{workdir}}/nwb/{{stem}};
      printf '%s' "$spec_json" > {{workdir}}/specs/{{spec}};
      neuroconv {{workdir}}/specs/{{spec}}
      --data-folder-path {{workdir}}/data/{{stem}} --output-folder-path {{workdir}}/nwb/{{stem}} --overwrite;
      test -s {{workdir}}/nwb/{{stem}}/{{nwbfile_name}} || {{{{ echo corral: neuroconv wrote no {{nwbfile_name}} >&2; exit 1; }}}}
{upload}
  # Free the scratch space of a session once it is done.
  - name: cleanup
    needs: [{cleanup_needs}]
    command: rm -rf {{workdir}}/data/{{stem}} {{workdir}}/nwb/{{stem}} {{workdir}}/dandi/{{stem}} {{workdir}}/specs/{{spec}}
"""


@dataclass
class BidsStarter:
    name: str
    dataset: str  # local folder or s3:// URI, as the workflow reads it
    image: str
    app: str | None = None  # the app's command (default: the image's name, e.g. mriqc for bids/mriqc)
    results: str = "derivatives/app"
    datatypes: list[str] = field(default_factory=list)
    require: list[str] = field(default_factory=list)
    gpus: int = 0
    anonymous: bool = False


def bids_workflow(s: BidsStarter) -> str:
    app = s.app or s.image.rsplit("/", 1)[-1].split(":", 1)[0]
    command = f"command: {app} {{workdir}}/scans/{{item}} {{workdir}}/out/{{item}} participant --participant_label {{subject}}"
    filters = ""
    if s.datatypes:
        filters += f"\n  datatypes: [{', '.join(s.datatypes)}]"
    if s.require:
        filters += f"\n  require: [{', '.join(s.require)}]"
    if s.anonymous:
        filters += "\n  anonymous: true     # public bucket: list without credentials"
    gpus = f", gpus: {s.gpus}" if s.gpus else ""
    return f"""# Written by `corral recipe bids`: a starting point, edit freely.
# One chain of tasks per scan (subject × session) of {s.dataset}:
#   pull (the dataset's top-level files, what the scan inherits, the scan's folder) -> {app} (BIDS App, participant level)
#   -> push (outputs to {s.results}) -> cleanup
name: {s.name}
defaults:
  resources: {{vcpus: 1, memory: 2GiB}}
  retries: 1
  timeout: 2h

items:
  bids: {_q(s.dataset)}{filters}

stages:
  # A BIDS App reads a whole dataset: give each scan a small one of its own: the dataset's top-level
  # files, and what applies to the scan by BIDS inheritance from above its folder ({{inherit_filter}}:
  # top-level dwi.bval/dwi.bvec, task-*_bold.json, sub-<label>/ sidecars of a subject with sessions).
  - name: pull-top
    from: {_q(s.dataset)}
    to: "workspace://scans/{{item}}"
    filters: ["+ /*.json", "+ /*.tsv", "+ {{inherit_filter}}", "- *"]

  - name: pull
    needs: [pull-top]
    from: "{{uri}}"
    to: "workspace://scans/{{item}}/{{path}}"

  # corral runs the command under /bin/sh: an image that starts its app from ENTRYPOINT (most BIDS
  # Apps) needs a thin derived image with `ENTRYPOINT []` (FROM {s.image}), as AWS Batch cannot
  # replace an entrypoint.
  - name: app
    needs: [pull]
    image: {_q(s.image)}
    resources: {{vcpus: 4, memory: 16GiB{gpus}}}
    timeout: 24h
    {command}

  - name: push
    needs: [app]
    from: "workspace://out/{{item}}"
    to: {_q(s.results)}

  - name: cleanup
    needs: [push]
    command: rm -rf {{workdir}}/scans/{{item}} {{workdir}}/out/{{item}}
"""
