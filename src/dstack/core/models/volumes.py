"""`type: volume` and the `volumes:` of a run: storage that outlives the runs that use it.

A volume configuration follows dstack's shape (`name`, `backend`, `region`, `availability_zone`,
`size`, `volume_id` for an existing volume). `backend: local` is the server's own host; `backend:
ssh` is a host of an SSH fleet: `region` names the fleet and `availability_zone` (optional) the
host, as its address is listed in the fleet's `ssh_config.hosts`; without it the server picks the
fleet's first reachable host when the volume is created, and the volume stays on that host like
a zonal disk (docs/architecture.md, Volumes). A volume is a directory under its host's agent data
dir; `volume_id` registers an existing directory of that host instead (an absolute path, never
deleted by `dstack volume delete`). `size` is a hard limit where the host's agent runs as root
with mkfs.ext4 (agent/volume_image.py), else recorded and shown as not enforced. `shared: true`
lets several runs attach the volume at once; otherwise one run at a time.

A run mounts volumes with `volumes:` entries, each either a named volume (`NAME:/job/path` or
`{name, path}`) or a path of the instance (`/host/dir:/job/dir` or `{instance_path, path}`).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from dstack.core.limits import MAX_PATH
from dstack.core.models.resources import Memory
from dstack.core.names import validate_name

MAX_MOUNTS_PER_RUN = 32
#: backends a volume may name: the server's own host, and the hosts of SSH fleets
SUPPORTED_BACKENDS = ("local", "ssh")
MAX_HOST = 255
#: job paths a mount may not cover (the job needs them as the host has them)
FORBIDDEN_TARGETS = ("/", "/proc", "/sys", "/dev", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/run", "/tmp")
_FORBIDDEN_UNDER = ("/proc/", "/sys/", "/dev/")


def check_absolute_path(value: str, what: str) -> str:
    """An absolute, normalised path without `..`, NUL or newlines."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty absolute path")
    if len(value) > MAX_PATH:
        raise ValueError(f"{what} is longer than {MAX_PATH} characters")
    if any(c in value for c in "\x00\n\r"):
        raise ValueError(f"{what} may not contain NUL or line breaks")
    if not value.startswith("/"):
        raise ValueError(f"{what} must be an absolute path (starting with '/'), got {value[:100]!r}")
    if ".." in value.split("/"):
        raise ValueError(f"{what} may not contain '..'")
    return posixpath.normpath(value)


def check_job_path(value: str) -> str:
    path = check_absolute_path(value, "a volume's path in the job")
    if path in FORBIDDEN_TARGETS or path.startswith(_FORBIDDEN_UNDER):
        raise ValueError(f"a volume may not be mounted at {path} (the job needs the host's)")
    return path


class VolumeConfiguration(BaseModel):
    """`type: volume`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["volume"] = "volume"
    name: str
    backend: str = "local"
    #: `local`: the one region `local`; `ssh`: the fleet's name
    region: str | None = Field(default=None, max_length=100, validate_default=True)
    #: `ssh`: the host of the fleet (its address in `ssh_config.hosts`); None: the first reachable one
    availability_zone: str | None = Field(default=None, max_length=MAX_HOST)
    size: Memory | None = None
    #: an existing volume: an existing directory of the volume's host
    volume_id: str | None = Field(default=None, max_length=MAX_PATH)
    #: several runs may attach it at once (else one run at a time)
    shared: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name("volume", value)

    @field_validator("backend")
    @classmethod
    def _backend(cls, value: str) -> str:
        if value not in SUPPORTED_BACKENDS:
            raise ValueError(f"unknown volume backend {value!r}; this server has: {', '.join(SUPPORTED_BACKENDS)}")
        return value

    @field_validator("region", mode="after")
    @classmethod
    def _region(cls, value: str | None, info: ValidationInfo) -> str | None:
        backend = info.data.get("backend")
        if backend == "ssh":
            if value is None:
                raise ValueError("backend ssh needs region: the name of the fleet whose host keeps the volume")
            return validate_name("fleet", value)
        if value is not None and value != "local":
            raise ValueError(f"backend local has one region, 'local' (got {value!r})")
        return value

    @field_validator("availability_zone")
    @classmethod
    def _availability_zone(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if info.data.get("backend") != "ssh":
            raise ValueError("backend local has one host (the server's); availability_zone is for backend ssh")
        if not value or any(c.isspace() or c in "\x00/" for c in value):
            raise ValueError(f"availability_zone is a host of the fleet as listed in its hosts, got {value[:100]!r}")
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: Memory | None) -> Memory | None:
        if value is not None and not (0 < float(value) <= 1024 * 1024):
            raise ValueError("size must be above 0 and at most 1PB")
        return value

    @field_validator("volume_id")
    @classmethod
    def _volume_id(cls, value: str | None) -> str | None:
        return None if value is None else check_absolute_path(value, "volume_id (an existing directory)")


@dataclass(frozen=True)
class VolumeHome:
    """Where a named volume lives, for placement: the server's host (`local`), or one fleet host
    (`ssh`, `region` the fleet, `host` its address)."""

    backend: str
    region: str
    host: str | None = None

    def admits(self, backend: str, region: str, hostname: str | None) -> bool:
        """Whether an instance (its backend, region and hostname) holds this volume."""
        if self.backend == "ssh":
            return backend == "ssh" and region == self.region and hostname == self.host
        return backend == self.backend

    def describe(self) -> str:
        if self.backend == "ssh":
            return f"host {self.host} of fleet {self.region}"
        return "the server's host (backend local)"


class VolumeMountPoint(BaseModel):
    """A named volume mounted at `path` in the job."""

    model_config = ConfigDict(extra="forbid")

    name: str
    path: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return validate_name("volume", value)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_job_path(value)


class InstanceMountPoint(BaseModel):
    """A directory of the instance (host) mounted at `path` in the job."""

    model_config = ConfigDict(extra="forbid")

    instance_path: str
    path: str

    @field_validator("instance_path")
    @classmethod
    def _instance_path(cls, value: str) -> str:
        return check_absolute_path(value, "instance_path")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return check_job_path(value)


def parse_mount(value: Any) -> VolumeMountPoint | InstanceMountPoint:
    """`NAME:/path`, `/host/dir:/path`, `{name, path}` or `{instance_path, path}`."""
    if isinstance(value, (VolumeMountPoint, InstanceMountPoint)):
        return value
    if isinstance(value, str):
        source, sep, target = value.rpartition(":")
        if not sep or not source or not target:
            raise ValueError(f"a volume entry is NAME:/path or /host/dir:/path, got {value[:100]!r}")
        if source.startswith("/"):
            return InstanceMountPoint(instance_path=source, path=target)
        return VolumeMountPoint(name=source, path=target)
    if isinstance(value, dict):
        if "instance_path" in value:
            return InstanceMountPoint.model_validate(value)
        if isinstance(value.get("name"), list):  # dstack allows a list of names (one per node)
            raise ValueError("a list of volume names is not supported yet; name one volume")
        return VolumeMountPoint.model_validate(value)
    raise ValueError("a volume entry is a string (NAME:/path, /host/dir:/path) or a mapping {name, path}")


def parse_mounts(value: Any) -> list[VolumeMountPoint | InstanceMountPoint]:
    """The run's `volumes:` list, each entry parsed, no job path twice."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError("volumes must be a list")
    if len(value) > MAX_MOUNTS_PER_RUN:
        raise ValueError(f"at most {MAX_MOUNTS_PER_RUN} volumes per run")
    mounts = [parse_mount(v) for v in value]
    seen: set[str] = set()
    for m in mounts:
        if m.path in seen:
            raise ValueError(f"two volumes are mounted at {m.path}")
        seen.add(m.path)
    return mounts


def named_volumes(mounts: list[VolumeMountPoint | InstanceMountPoint]) -> list[str]:
    """The names of the named volumes among `mounts`, in order, once each."""
    out: list[str] = []
    for m in mounts:
        if isinstance(m, VolumeMountPoint) and m.name not in out:
            out.append(m.name)
    return out
