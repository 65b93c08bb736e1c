"""`type: fleet` — the user's own hosts, reached over SSH, that dstack deploys its agent to.

The shape follows dstack's: `ssh_config` holds defaults (`user`, `port`, `identity_file`,
`proxy_jump`) and `hosts`, each an address or a mapping that overrides them. Private keys are
read by the client (`identity_file`) and travel as `ssh_key` (the server stores them encrypted,
never answers them back); a configuration may also carry `ssh_key` directly (the Python API).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dstack.core.models.common import Env
from dstack.core.models.resources import ResourcesSpec
from dstack.core.names import validate_name

MAX_FLEET_HOSTS = 1000
MAX_KEY_BYTES = 16384
_HOSTNAME = re.compile(r"^[A-Za-z0-9_.:\-\[\]]{1,253}$")
_USER = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")


def _check_hostname(value: str) -> str:
    if not _HOSTNAME.match(value):
        raise ValueError(f"invalid hostname {value[:60]!r}: letters, digits, '.', '-', ':' (at most 253)")
    return value


def _check_user(value: str | None) -> str | None:
    if value is not None and not _USER.match(value):
        raise ValueError(f"invalid SSH user {value[:60]!r}")
    return value


class SSHKey(BaseModel):
    """A private key's text (OpenSSH or PEM) and optionally its public half."""

    model_config = ConfigDict(extra="forbid")

    private: str = Field(max_length=MAX_KEY_BYTES, repr=False)
    public: str | None = Field(default=None, max_length=MAX_KEY_BYTES)


class _SSHEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    identity_file: str | None = Field(default=None, max_length=4096)
    ssh_key: SSHKey | None = None

    @field_validator("user")
    @classmethod
    def _user(cls, value: str | None) -> str | None:
        return _check_user(value)


class SSHProxyParams(_SSHEndpoint):
    """`proxy_jump`: the bastion the hosts are reached through."""

    hostname: str

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        return _check_hostname(value)


class SSHHostParams(_SSHEndpoint):
    """One host; unset fields come from `ssh_config`."""

    hostname: str
    proxy_jump: SSHProxyParams | None = None
    #: the address other hosts of the fleet reach it on (multi-node jobs); default: probed
    internal_ip: str | None = Field(default=None, max_length=64)

    @field_validator("internal_ip")
    @classmethod
    def _internal_ip(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"invalid internal_ip {value[:60]!r}: expected an IP address") from None
        return value

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        return _check_hostname(value)


class SSHParams(_SSHEndpoint):
    """`ssh_config`: defaults for every host, and the hosts."""

    proxy_jump: SSHProxyParams | None = None
    hosts: list[SSHHostParams] = Field(min_length=1, max_length=MAX_FLEET_HOSTS)

    @field_validator("hosts", mode="before")
    @classmethod
    def _addresses(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"hostname": h} if isinstance(h, str) else h for h in value]
        return value

    @model_validator(mode="after")
    def _unique(self) -> SSHParams:
        seen: set[tuple[str, int | None]] = set()
        for i, h in enumerate(self.hosts):
            key = (h.hostname, h.port or self.port)
            if key in seen:
                from dstack.core.models.configurations import FieldValueError

                raise FieldValueError(("hosts", i), f"host {h.hostname!r} is listed twice")
            seen.add(key)
        return self

    def resolved_hosts(self) -> list[SSHHostParams]:
        """Each host with the defaults filled in (user root and port 22 when nothing says)."""
        out = []
        for h in self.hosts:
            out.append(
                SSHHostParams(
                    hostname=h.hostname,
                    user=h.user or self.user or "root",
                    port=h.port or self.port or 22,
                    identity_file=h.identity_file or self.identity_file,
                    ssh_key=h.ssh_key or self.ssh_key,
                    proxy_jump=h.proxy_jump or self.proxy_jump,
                    internal_ip=h.internal_ip,
                )
            )
        return out


class FleetConfiguration(BaseModel):
    """`type: fleet`: a named group of hosts that runs jobs."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["fleet"] = "fleet"
    name: str | None = None
    placement: Literal["any", "cluster"] = "any"
    ssh_config: SSHParams | None = None
    env: Env = Field(default_factory=dict)
    resources: ResourcesSpec | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else validate_name("fleet", value)

    @model_validator(mode="after")
    def _check(self) -> FleetConfiguration:
        if self.ssh_config is None:
            from dstack.core.models.configurations import FieldValueError

            raise FieldValueError("ssh_config", "ssh_config is required: only SSH fleets (your own hosts) exist here")
        return self


Fleet = FleetConfiguration
