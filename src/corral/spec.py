"""The workflow file: pydantic models, and loading that reports file:line:col for every error.

A workflow has a ``name``, ``defaults`` (anything a stage can set), ``items`` (a source of
items) and ``stages``. See the README's "Workflow reference" for every field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from corral.errors import SpecError, did_you_mean
from corral.units import parse_duration, parse_size
from corral.yamlpos import Located, load_file, load_text

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The largest machines any backend offers (AWS u-24tb1: 448 vCPUs, 24 TiB; 16 GPUs on p-class
# hosts). Asking for more can never be satisfied anywhere, so it is refused when the file is read.
MAX_VCPUS = 448
MAX_MEMORY_MIB = 24 * 1024 * 1024
MAX_GPUS = 16
MAX_DISK_GIB = 16 * 1024


def _check_name(kind: str, v: str) -> str:
    if not NAME_RE.match(v):
        raise ValueError(f"{kind} name {v!r} must start with a letter and hold only letters, digits, - and _ (≤ 63)")
    return v


def _memory_mib(v: object) -> int:
    return -(-parse_size(v, default_unit="MiB") // 2**20)


def _disk_gib(v: object) -> int | None:
    if v is None:
        return None
    return -(-parse_size(v, default_unit="GiB") // 2**30)


def _duration(v: object) -> float | None:
    return None if v is None else parse_duration(v)


def _str_value(v: object) -> str:
    """Environment values: numbers and booleans are written as YAML scalars; keep them as text."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return str(v)
    raise ValueError("an environment value must be a string or a number")


def _number(v: object) -> object:
    """A count or amount: YAML's true/false are not numbers (pydantic would read true as 1)."""
    if isinstance(v, bool):
        raise ValueError("expected a number, not true/false")
    return v


def _filter_rule(v: object) -> object:
    """An rclone filter rule, checked as rclone would: ``+ PATTERN`` or ``- PATTERN``, brackets closed."""
    if not isinstance(v, str) or len(v) < 3 or v[:2] not in ("+ ", "- ") or not v[2:].strip():
        raise ValueError(f"filter {v!r} is not an rclone filter rule: write `+ PATTERN` to include or "
                         "`- PATTERN` to exclude (e.g. '+ *.nwb', '- *')")
    pattern = v[2:]
    if "{{" in pattern:  # rclone's {{regexp}}: only the regexp delimiters are checked here
        if pattern.count("{{") != pattern.count("}}"):
            raise ValueError(f"filter {v!r}: its {{{{ and }}}} do not pair up (rclone refuses the pattern)")
        return v
    depth_brace = depth_bracket = 0
    escaped = False
    for c in pattern:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == "{":
            depth_brace += 1
        elif c == "}":
            depth_brace -= 1
        elif c == "[":
            depth_bracket += 1
        elif c == "]":
            depth_bracket -= 1
        if depth_brace < 0 or depth_bracket < 0 or depth_brace > 1:
            break
    if depth_brace or depth_bracket or escaped:
        raise ValueError(f"filter {v!r}: its {{...}} or [...] do not pair up (rclone refuses the pattern)")
    return v


Count = Annotated[int, BeforeValidator(_number)]
Amount = Annotated[float, BeforeValidator(_number)]
FilterRule = Annotated[str, BeforeValidator(_filter_rule)]
MemoryMiB = Annotated[int, BeforeValidator(_memory_mib), Field(gt=0, le=MAX_MEMORY_MIB)]
DiskGiB = Annotated[int | None, BeforeValidator(_disk_gib)]


def _shm_mib(v: object) -> int | None:
    return None if v is None else _memory_mib(v)


ShmMiB = Annotated[int | None, BeforeValidator(_shm_mib)]

MAX_RETRY_FACTOR = 16.0
_FACTOR_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[xX]\s*$")


def _retry_memory(v: object) -> float | list[int] | None:
    """``resources.retry_memory``: a factor (``2x``, ``1.5x``) or a list of sizes (``[8GiB, 16GiB]``),
    the memory of the attempts after each out-of-memory kill. A bare number is refused: it could
    mean a factor or MiB."""
    if v is None:
        return None
    if isinstance(v, str) and (m := _FACTOR_RE.match(v)):
        return float(m.group(1))
    if isinstance(v, list) and v and not any(isinstance(x, bool) for x in v):
        return [_memory_mib(x) for x in v]
    raise ValueError(f"retry_memory {v!r} is neither a factor (write `2x`) nor a list of sizes "
                     "(write [8GiB, 16GiB])")


RetryMemory = Annotated[float | list[int] | None, BeforeValidator(_retry_memory)]
Seconds = Annotated[float | None, BeforeValidator(_duration)]
EnvValue = Annotated[str, BeforeValidator(_str_value)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=False)


class Resources(Model):
    """What one task needs: vCPUs, memory (MiB once parsed), GPUs, scratch disk (GiB), and the size
    of ``/dev/shm`` (MiB; containers only — Docker's default is 64 MiB, too small for sorters that
    share arrays between processes)."""

    vcpus: Amount = Field(1, gt=0, le=MAX_VCPUS)
    memory: MemoryMiB = 2048
    gpus: Count = Field(0, ge=0, le=MAX_GPUS)
    disk: DiskGiB = Field(None)
    shm: ShmMiB = Field(None)
    # after an out-of-memory kill, the next attempt asks for more (see corral.backends.oom)
    retry_memory: RetryMemory = Field(None)

    @field_serializer("retry_memory")
    def _retry_memory_text(self, v: float | list[int] | None) -> str | list[int] | None:
        return f"{v:g}x" if isinstance(v, float) else v  # as written: a manifest reads back the same

    @field_validator("retry_memory")
    @classmethod
    def _retry_memory_grows(cls, v: float | list[int] | None, info: ValidationInfo) -> float | list[int] | None:
        if isinstance(v, float) and not 1.0 < v <= MAX_RETRY_FACTOR:
            raise ValueError(f"retry_memory {v:g}x must be more than 1x and at most {MAX_RETRY_FACTOR:g}x")
        if isinstance(v, list):
            memory = info.data.get("memory")
            before = memory if isinstance(memory, int) else 0
            for size in v:
                if size <= before:
                    raise ValueError(f"retry_memory sizes must grow: {size}MiB is not more than "
                                     f"{'memory' if before == memory else 'the size before it'} ({before}MiB)")
                if size > MAX_MEMORY_MIB:
                    raise ValueError(f"retry_memory size {size}MiB is more than any machine has "
                                     f"({MAX_MEMORY_MIB}MiB)")
                before = size
        return v

    @field_validator("shm")
    @classmethod
    def _shm_positive(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("shm must be at least 1MiB")
        return v

    @model_validator(mode="after")
    def _shm_within_memory(self) -> Resources:
        # /dev/shm is memory: it counts against the container's memory limit
        if self.shm is not None and self.shm > self.memory:
            raise ValueError(f"shm ({self.shm}MiB) must not exceed memory ({self.memory}MiB): /dev/shm is memory")
        return self

    @field_validator("disk")
    @classmethod
    def _disk_range(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_DISK_GIB:
            raise ValueError(f"disk must be between 1GiB and {MAX_DISK_GIB}GiB")
        return v


class StageFields(Model):
    """Fields that ``defaults`` may set for every stage."""

    image: str | None = None
    env: dict[str, EnvValue] = Field(default_factory=dict)
    secrets: dict[str, str] = Field(
        default_factory=dict,
        description="environment variable -> secret reference (env:NAME locally; a secret name on AWS)",
    )
    resources: Resources = Field(default_factory=Resources)
    retries: Count = Field(0, ge=0, le=9)
    timeout: Seconds = Field(None)

    @field_validator("env", "secrets")
    @classmethod
    def _env_names(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not isinstance(k, str) or not ENV_RE.match(k):
                raise ValueError(f"{k!r} is not a valid environment variable name (letters, digits, _)")
        return v

    @field_validator("timeout")
    @classmethod
    def _timeout_floor(cls, v: float | None) -> float | None:
        if v is not None and v > 14 * 86400:
            raise ValueError("timeout may be at most 14 days")
        return v


class Defaults(StageFields):
    pass


class Stage(StageFields):
    name: str
    kind: Literal["command", "transfer", "cleanup"] = "command"
    command: str | list[str] | None = None
    needs: list[str] = Field(default_factory=list)
    per: Literal["item", "run"] = "item"
    # at most this many of the stage's tasks at once (e.g. 20 DANDI uploads, 8 GPU sorts)
    max_parallel: int | None = Field(None, ge=1, le=100_000)
    inputs: list[str] = Field(default_factory=list)
    outputs: list[str] = Field(default_factory=list)
    # transfer stages
    source: str | None = Field(None, alias="from")
    dest: str | None = Field(None, alias="to")
    mode: Literal["copy", "sync"] = "copy"
    filters: list[FilterRule] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name("stage", v)

    @field_validator("command")
    @classmethod
    def _command(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, str) and not v.strip():
            raise ValueError("command is empty")
        if isinstance(v, list) and not v:
            raise ValueError("command is an empty list")
        return v

    @model_validator(mode="after")
    def _retry_memory_needs_retries(self) -> Stage:
        if self.resources.retry_memory is not None and self.retries < 1:
            raise ValueError("resources.retry_memory sets the memory of retries, and this stage has retries: 0: "
                             "add `retries: N` (each out-of-memory retry is one of them)")
        return self

    @model_validator(mode="after")
    def _kind(self) -> Stage:
        if (self.source is not None or self.dest is not None) and self.command is not None:
            raise ValueError("a stage runs a `command` or is a transfer (`from`/`to`), not both: "
                             "split it into two stages")
        if self.source is not None or self.dest is not None:
            if self.kind == "command" and self.command is None:
                self.kind = "transfer"
        if self.kind == "transfer":
            if not self.source or not self.dest:
                raise ValueError("a transfer stage needs both `from` and `to`")
            if self.command is not None:
                raise ValueError("a transfer stage has `from`/`to`, not `command`")
        elif self.kind == "command" and self.command is None:
            raise ValueError("a stage needs a `command` (or `from`/`to` for a transfer)")
        return self


# The values PutRetentionPolicy accepts (CloudWatch Logs API reference, retentionInDays).
LOG_RETENTION_DAYS = (1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557,
                      2922, 3288, 3653)


class AwsSettings(Model):
    """Settings for ``--backend aws``; every field is optional and discovered when missing."""

    region: str | None = None
    profile: str | None = None
    bucket: str | None = None
    prefix: str = "corral"
    spot: bool = False
    max_vcpus: Count = Field(256, ge=1, le=100_000)
    subnets: list[str] = Field(default_factory=list)
    security_groups: list[str] = Field(default_factory=list)
    instance_types: list[str] = Field(default_factory=lambda: ["optimal"])
    tags: dict[str, str] = Field(default_factory=dict)
    queue: str | None = None
    efs: bool = False
    # Fargate jobs get a public IP (to pull images in a public subnet without a NAT gateway);
    # false for private subnets that reach registries through NAT or VPC endpoints.
    assign_public_ip: bool = True
    secrets: Literal["secretsmanager", "ssm"] = "secretsmanager"  # where a run's rclone config is kept
    # How long corral's CloudWatch log group keeps job logs (PutRetentionPolicy); null: for ever.
    log_retention_days: int | None = 30
    # The share identifier of jobs submitted to a fair-share queue (aws.queue with a scheduling policy).
    share_identifier: str = "corral"

    @field_validator("log_retention_days")
    @classmethod
    def _retention(cls, v: int | None) -> int | None:
        if v is not None and v not in LOG_RETENTION_DAYS:
            raise ValueError(f"log_retention_days {v} is not one CloudWatch Logs accepts: "
                             f"{', '.join(map(str, LOG_RETENTION_DAYS))} (or null: keep for ever)")
        return v

    @field_validator("share_identifier")
    @classmethod
    def _share(cls, v: str) -> str:
        # SubmitJob shareIdentifier: letters, numbers and underscores, up to 255 (Batch API reference)
        if not re.fullmatch(r"[A-Za-z0-9_]{1,255}", v):
            raise ValueError("share_identifier may hold only letters, numbers and underscores (at most 255)")
        return v


SBATCH_OPTION_RE = re.compile(r"^--[a-z][a-z0-9-]*(=\S.*)?$")


def _sbatch_line(v: str) -> str:
    """One ``#SBATCH`` option: ``--name`` or ``--name=value`` on one line (``#SBATCH`` itself optional)."""
    text = v.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH"):].strip()
    if "\n" in text or not SBATCH_OPTION_RE.match(text):
        raise ValueError(f"{v!r} is not one sbatch option: write it as --name=value (e.g. --constraint=avx2)")
    return text


SbatchLine = Annotated[str, BeforeValidator(_sbatch_line)]


class SlurmStage(Model):
    """Per-stage overrides of the ``slurm:`` settings."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    extra: list[SbatchLine] = Field(default_factory=list, description="more #SBATCH options for this stage")


class SlurmSettings(SlurmStage):
    """Settings for ``--backend slurm``; every field is optional (the cluster's defaults apply)."""

    stages: dict[str, SlurmStage] = Field(default_factory=dict, description="stage name -> overrides")


class Workflow(Model):
    name: str
    description: str = ""
    defaults: Defaults = Field(default_factory=Defaults)
    items: list[dict[str, Any]] | dict[str, Any] | None = None
    stages: list[Stage] = Field(min_length=1)
    cleanup: bool = False
    aws: AwsSettings = Field(default_factory=AwsSettings)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)

    _located: Located | None = PrivateAttr(default=None)
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name("workflow", v)

    @model_validator(mode="after")
    def _unique_stages(self) -> Workflow:
        seen: set[str] = set()
        for s in self.stages:
            if s.name in seen:
                raise ValueError(f"two stages are named {s.name!r}; stage names must be unique")
            seen.add(s.name)
        return self

    # -- location helpers ---------------------------------------------------------------------
    @property
    def source(self) -> str:
        return self._located.source if self._located else "<workflow>"

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths (tables, globs, outputs) are read against."""
        return self._base_dir

    def where(self, *path: str | int, key: bool = False) -> str:
        return self._located.where(path, key=key) if self._located else self.source

    def stage_where(self, stage: str, *field: str | int) -> str:
        for i, s in enumerate(self.stages):
            if s.name == stage:
                return self.where("stages", i, *field)
        return self.source

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    def spec_error(self, message: str, hint: str, *path: str | int) -> SpecError:
        return SpecError(message, hint, where=self.where(*path))


_DEFAULTABLE = set(StageFields.model_fields)


def _merge_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """Apply ``defaults`` to each stage's raw mapping: stage values win; env/resources merge by key."""
    defaults = raw.get("defaults")
    stages = raw.get("stages")
    if not isinstance(defaults, dict) or not isinstance(stages, list):
        return raw
    merged_stages = []
    for st in stages:
        if not isinstance(st, dict):
            merged_stages.append(st)
            continue
        new = dict(st)
        for key, value in defaults.items():
            if key not in _DEFAULTABLE:
                continue
            if key in ("env", "secrets", "resources") and isinstance(value, dict):
                if isinstance(st.get(key), dict):
                    new[key] = {**value, **st[key]}
                elif key not in st:
                    new[key] = dict(value)
            elif key not in st:
                new[key] = value
        merged_stages.append(new)
    return {**raw, "stages": merged_stages}


def from_located(located: Located, base_dir: Path | None = None) -> Workflow:
    raw = located.data
    if not isinstance(raw, dict):
        raise SpecError(
            f"a workflow is a mapping of keys (name, items, stages), not a {type(raw).__name__}",
            "start the file with `name: my-workflow`",
            where=located.where(()),
        )
    # Validate defaults alone first, so their errors point at `defaults`, not at a stage.
    if raw.get("defaults") is not None:
        try:
            Defaults.model_validate(raw["defaults"])
        except ValidationError as exc:
            raise _spec_error_from(exc, located, raw, prefix=("defaults",)) from None
    stages = raw.get("stages")
    if isinstance(stages, list):
        seen: dict[object, int] = {}
        for j, st in enumerate(stages):
            name = st.get("name") if isinstance(st, dict) else None
            if isinstance(name, str) and name in seen:
                raise SpecError(
                    f"stages[{j}]: a stage named {name!r} is already defined (stages[{seen[name]}], "
                    f"{located.where(('stages', seen[name], 'name'))})",
                    "stage names must be unique: rename one of them", where=located.where(("stages", j, "name")))
            seen[name] = j
    try:
        wf = Workflow.model_validate(_merge_defaults(raw))
    except ValidationError as exc:
        raise _spec_error_from(exc, located, raw) from None
    wf._located = located
    wf._base_dir = base_dir or (Path(located.source).resolve().parent if located.source else Path.cwd())
    return wf


def load_workflow(path: str | Path) -> Workflow:
    """Read and validate a workflow file. Raises :class:`SpecError` naming file:line:col."""
    located = load_file(path)
    return from_located(located, Path(path).resolve().parent)


def loads_workflow(text: str, source: str = "<string>", base_dir: Path | None = None) -> Workflow:
    return from_located(load_text(text, source), base_dir or Path.cwd())


# -- error translation --------------------------------------------------------------------------
def _loc_path(loc: tuple[Any, ...], raw: Any) -> tuple[str | int, ...]:
    """pydantic's loc, minus the union-branch labels it inserts, checked against the raw data."""
    out: list[str | int] = []
    node = raw
    for part in loc:
        if isinstance(node, dict) and part in node or isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part not in node and part in (
            "from", "to"
        ):
            out.append(part)
            node = None
        # else: a union label such as 'str' or 'list[str]', or a key that is missing: skip
    return tuple(out)


def _dotted(path: tuple[str | int, ...], raw: Any) -> str:
    text = ""
    node = raw
    for part in path:
        if isinstance(part, int):
            label = f"[{part}]"
            if isinstance(node, list) and isinstance(node[part], dict) and isinstance(node[part].get("name"), str):
                label = f"[{part}] ({node[part]['name']})"
            text += label
        else:
            text += ("." if text else "") + str(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return text or "(top level)"


def _model_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    model: Any = Workflow
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        fields = {f.alias or n: f for n, f in model.model_fields.items()}
        f = fields.get(part)
        if f is None:
            return None
        model = _unwrap(f.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    for _ in range(5):
        origin = get_origin(tp)
        if origin is None:
            return tp
        args = [a for a in get_args(tp) if a is not type(None)]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            return models[0]
        if origin in (list, tuple) and args or origin is Annotated:
            tp = args[0]
        else:
            return tp
    return tp


_HINTS = {
    "missing": "add it",
    "int_parsing": "write a whole number",
    "int_type": "write a whole number",
    "float_parsing": "write a number",
    "bool_parsing": "write true or false",
    "string_type": "write text (quote it if YAML reads it as something else)",
    "list_type": "write a list (`- a` lines, or [a, b])",
    "dict_type": "write a mapping of `key: value` lines",
    "literal_error": "use one of the allowed values",
    "greater_than": "use a larger value",
    "less_than_equal": "use a smaller value",
    "too_short": "add at least one entry",
}


def _spec_error_from(
    exc: ValidationError, located: Located, raw: Any, prefix: tuple[str | int, ...] = ()
) -> SpecError:
    errors = exc.errors(include_url=False)
    err = errors[0]
    # Prefer the most informative error when pydantic reports several: an unknown key first (a
    # typo such as `stagess:` also makes `stages` missing), then a missing field or a value error.
    for wanted in ("extra_forbidden", "missing", "value_error"):
        found = [e for e in errors if e["type"] == wanted]
        if found:
            err = found[0]
            break
    loc = prefix + tuple(err["loc"])
    etype = err["type"]
    if etype == "extra_forbidden":
        path = _loc_path(loc, raw)
        key = loc[-1]
        model = _model_at(path[:-1]) if path and path[-1] == key else _model_at(path)
        allowed = sorted(f.alias or n for n, f in model.model_fields.items()) if model else []
        hint = did_you_mean(key, allowed, otherwise="allowed keys", show=len(allowed))
        return SpecError(
            f"{_dotted(path[:-1], raw) if len(path) > 1 else '(top level)'}: unknown key {key!r}",
            hint,
            where=located.where(path, key=True),
        )
    path = _loc_path(loc, raw)
    if etype == "missing":
        field_name = str(loc[-1])
        return SpecError(
            f"{_dotted(path, raw)}: missing required field {field_name!r}",
            f"add `{field_name}:`",
            where=located.where(path),
        )
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    elif msg.startswith("Assertion failed, "):
        msg = msg[len("Assertion failed, ") :]
    hint = _HINTS.get(etype, "see the workflow reference in the README")
    if "input" in err and etype not in ("value_error", "assertion_error") and not isinstance(
        err["input"], (dict, list)
    ):
        shown = repr(err["input"])
        msg = f"{msg} (got {shown[:60]})"
    return SpecError(f"{_dotted(path, raw)}: {msg}", hint, where=located.where(path))
