"""A job's volumes on the agent: where each lives on this host, and how it gets into the job.

The server sends `AgentMount`s: a volume of ours by id (kept at `<agent home>/volumes/<id>`,
made on first use and owned by the job's user), or a host directory (`instance_path`, which must
exist: the agent does not make host directories as root for a job). A host job sees them through
bind mounts in its own mount namespace: inside the sandbox's namespace where jobs are isolated
(agent.sandbox), else, when the agent is root, through `unshare --mount` and a small script; a
non-root agent cannot mount, and a job with volumes then fails saying so. A container gets them
as `-v SRC:DST`.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dstack.agent import volume_image
from dstack.core.models.volumes import check_absolute_path, check_job_path

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
#: bind sources are held here (inside the job's namespace) while directories are covered
MOUNT_STASH = "/run/dstack-agent/mounts"


class AgentMount(BaseModel):
    """One entry of `AgentJobSubmission.volumes`."""

    model_config = ConfigDict(extra="ignore")

    volume_id: str | None = None
    instance_path: str | None = Field(default=None, max_length=4096)
    path: str

    @field_validator("volume_id")
    @classmethod
    def _id(cls, v: str | None) -> str | None:
        if v is not None and (not _ID.match(v) or v in (".", "..")):
            raise ValueError("volume_id must be 1-128 letters, digits, '_', '.', '-'")
        return v

    @field_validator("instance_path")
    @classmethod
    def _instance_path(cls, v: str | None) -> str | None:
        return None if v is None else check_absolute_path(v, "instance_path")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        return check_job_path(v)

    @model_validator(mode="after")
    def _one_source(self) -> AgentMount:
        if (self.volume_id is None) == (self.instance_path is None):
            raise ValueError("a mount has either volume_id or instance_path")
        return self


@dataclass(frozen=True)
class Bind:
    """A host directory and where the job sees it."""

    source: Path
    target: str


class MountError(Exception):
    """A mount the job asked for cannot be made here (the job fails with this message)."""


def volumes_dir(home: Path) -> Path:
    return Path(home) / "volumes"


def resolve(home: Path, mounts: list[AgentMount], owner: tuple[int, int] | None) -> list[Bind]:
    """Each mount's host directory, ready: a volume's made (0700, `owner`'s when given)."""
    binds: list[Bind] = []
    for m in mounts:
        if m.volume_id is not None:
            src = volumes_dir(home) / m.volume_id
            try:
                volumes_dir(home).mkdir(parents=True, exist_ok=True)
                os.chmod(volumes_dir(home), 0o711)  # users enter their own volume, nobody lists them
                src.mkdir(mode=0o700, exist_ok=True)
                if volume_image.ensure_mounted(src):  # a sized volume: its filesystem image
                    os.chmod(src, 0o700)
                if owner is not None and src.lstat().st_uid != owner[0]:
                    os.chown(src, owner[0], owner[1], follow_symlinks=False)
            except OSError as e:
                raise MountError(f"cannot prepare volume {m.volume_id}: {e}") from e
        else:
            assert m.instance_path is not None
            src = Path(m.instance_path)
            if not src.is_dir():
                raise MountError(f"instance path {m.instance_path} is not a directory on this host")
        binds.append(Bind(src, m.path))
    return binds


def stash_lines(binds: list[Bind], mount: str, mkdir: str) -> list[str]:
    """Shell lines, run first in the job's namespace: each source bound under the stash."""
    q = shlex.quote
    lines = [f"{mkdir} -p {q(MOUNT_STASH)}", f"{mount} -t tmpfs -o mode=0700,size=64k dstack-mounts {q(MOUNT_STASH)}"]
    for i, b in enumerate(binds):
        held = f"{MOUNT_STASH}/{i}"
        lines += [f"{mkdir} {q(held)}", f"{mount} --rbind {q(str(b.source))} {q(held)}"]
    return lines


def target_lines(binds: list[Bind], mount: str, mkdir: str) -> list[str]:
    """Shell lines, run last (after any covering): each stashed source bound at its target."""
    q = shlex.quote
    lines: list[str] = []
    for i, b in enumerate(binds):
        lines += [f"{mkdir} -p {q(b.target)}", f"{mount} --rbind {q(f'{MOUNT_STASH}/{i}')} {q(b.target)}"]
    return lines


def wrap_plain(argv: list[str], binds: list[Bind]) -> list[str]:
    """`argv` in a mount namespace of its own with `binds` (a root agent whose jobs are not isolated)."""
    if not binds:
        return argv
    if os.geteuid() != 0:
        raise MountError(
            "volumes need the agent to run as root (a job's volumes are bind mounts in its own mount namespace)"
        )
    script = "\n".join(["set -e", *stash_lines(binds, "mount", "mkdir"), *target_lines(binds, "mount", "mkdir")])
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "/bin/sh",
        "-c",
        script + '\nexec "$@"',
        "dstack-mounts",
        *argv,
    ]


def container_args(binds: list[Bind]) -> list[str]:
    """`-v SRC:DST` for each bind (podman and docker alike)."""
    out: list[str] = []
    for b in binds:
        out += ["-v", f"{b.source}:{b.target}"]
    return out
