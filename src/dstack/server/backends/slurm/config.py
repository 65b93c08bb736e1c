"""`type: slurm` entries of `~/.dstack/server/config.yml`: where Slurm's commands run and what
the backend submits with."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

#: Slurm names (partitions, accounts, QOS): what `sbatch` accepts, nothing a shell would read
SLURM_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$"
SlurmName = Annotated[str, StringConstraints(pattern=SLURM_NAME)]


class SlurmLogin(BaseModel):
    """The login host Slurm's commands run on, over SSH."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hostname: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9_.\-]+$")
    user: str = Field(default="root", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.][A-Za-z0-9_.\-]*$")
    port: int = Field(default=22, ge=1, le=65535)
    identity_file: str | None = Field(default=None, max_length=4096)
    #: the login host's key is checked against this file (default: the server user's ~/.ssh/known_hosts)
    known_hosts: str | None = Field(default=None, max_length=4096)


class SlurmBackendConfig(BaseModel):
    """One Slurm cluster a project submits to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["slurm"] = "slurm"
    #: omitted: Slurm's commands run on the server's own host
    login: SlurmLogin | None = None
    #: partitions offered (default: every partition `sinfo` lists)
    partitions: list[SlurmName] | None = Field(default=None, min_length=1, max_length=64)
    account: str | None = Field(default=None, pattern=SLURM_NAME)
    qos: str | None = Field(default=None, pattern=SLURM_NAME)
    #: a directory every node sees at the same path: agent homes, job output
    shared_dir: str | None = Field(default=None, min_length=1, max_length=4096, pattern=r"^/")
    #: the server's URL as the compute nodes reach it (serverless workers call its /v2 there);
    #: default: the URL the server gives its jobs
    server_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://[A-Za-z0-9_.\-\[\]:]+/?$")
