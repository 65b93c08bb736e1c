"""`client.fleets`: plan, apply, list, get and delete the project's SSH fleets.

`identity_file`s are read here, on the client's machine, and sent as `ssh_key` (the server
stores them encrypted and never sends them back); the server has no access to the user's files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstack.core.errors import ConfigurationError
from dstack.core.models.fleets import MAX_KEY_BYTES, FleetConfiguration, SSHKey

if TYPE_CHECKING:
    from dstack.api.client import Client

#: probing hosts and deploying agents take a while on slow links
APPLY_TIMEOUT = 300


@dataclass(frozen=True)
class FleetInstance:
    name: str
    instance_num: int
    hostname: str
    status: str  # provisioning | idle | busy | unreachable | terminated
    resources: dict[str, Any]
    resources_pretty: str
    backend: str = "ssh"
    region: str = ""
    internal_ip: str | None = None
    status_message: str | None = None
    jobs: list[str] = field(default_factory=list)
    price: float = 0.0

    @staticmethod
    def from_dict(d: dict[str, Any]) -> FleetInstance:
        return FleetInstance(
            name=d["name"],
            instance_num=int(d["instance_num"]),
            hostname=d["hostname"],
            status=d["status"],
            resources=d.get("resources") or {},
            resources_pretty=d.get("resources_pretty", ""),
            backend=d.get("backend", "ssh"),
            region=d.get("region", ""),
            internal_ip=d.get("internal_ip"),
            status_message=d.get("status_message"),
            jobs=list(d.get("jobs") or []),
            price=float(d.get("price") or 0.0),
        )


@dataclass(frozen=True)
class Fleet:
    name: str
    status: str
    instances: list[FleetInstance]
    spec: dict[str, Any]

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Fleet:
        return Fleet(
            name=d["name"],
            status=d.get("status", "active"),
            instances=[FleetInstance.from_dict(i) for i in d.get("instances") or []],
            spec=d.get("spec") or {},
        )


def _read_key(path: str, where: str) -> SSHKey:
    p = Path(path).expanduser()
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigurationError(f"{where}.identity_file: cannot read {path}: {e.strerror or e}", field=where) from e
    if len(data) > MAX_KEY_BYTES:
        raise ConfigurationError(f"{where}.identity_file: {path} is too large for a private key", field=where)
    public = None
    pub = p.with_name(p.name + ".pub")
    if pub.is_file():
        public = pub.read_text(errors="replace").strip()[:MAX_KEY_BYTES]
    return SSHKey(private=data.decode(errors="replace"), public=public)


def with_keys(conf: FleetConfiguration) -> FleetConfiguration:
    """A copy with each `identity_file` read into `ssh_key` (where no `ssh_key` is given)."""
    conf = conf.model_copy(deep=True)
    ssh = conf.ssh_config
    if ssh is None:
        return conf
    if ssh.identity_file and ssh.ssh_key is None:
        ssh.ssh_key = _read_key(ssh.identity_file, "ssh_config")
    if ssh.proxy_jump is not None and ssh.proxy_jump.identity_file and ssh.proxy_jump.ssh_key is None:
        ssh.proxy_jump.ssh_key = _read_key(ssh.proxy_jump.identity_file, "ssh_config.proxy_jump")
    for i, h in enumerate(ssh.hosts):
        if h.identity_file and h.ssh_key is None:
            h.ssh_key = _read_key(h.identity_file, f"ssh_config.hosts[{i}]")
        if h.proxy_jump is not None and h.proxy_jump.identity_file and h.proxy_jump.ssh_key is None:
            h.proxy_jump.ssh_key = _read_key(h.proxy_jump.identity_file, f"ssh_config.hosts[{i}].proxy_jump")
    return conf


class FleetCollection:
    def __init__(self, client: Client) -> None:
        self._client = client

    def _path(self, action: str) -> str:
        return f"/api/project/{self._client.project}/fleets/{action}"

    def _body(self, conf: FleetConfiguration) -> dict[str, Any]:
        return {"configuration": with_keys(conf).model_dump(mode="json", exclude_none=True)}

    def get_plan(self, configuration: FleetConfiguration) -> dict[str, Any]:
        """What applying would do; each new host is probed over SSH (CPUs, memory, disk, GPUs)."""
        plan: dict[str, Any] = self._client.api.post(
            self._path("get_plan"), self._body(configuration), timeout=APPLY_TIMEOUT
        )
        return plan

    def apply(self, configuration: FleetConfiguration) -> Fleet:
        """Create the fleet or update it in place; hosts come up in the background
        (`provisioning` → `idle`), see `get`."""
        return Fleet.from_dict(
            self._client.api.post(self._path("apply"), self._body(configuration), timeout=APPLY_TIMEOUT)
        )

    def list(self) -> list[Fleet]:
        return [Fleet.from_dict(d) for d in self._client.api.post(self._path("list"))]

    def get(self, name: str) -> Fleet:
        return Fleet.from_dict(self._client.api.post(self._path("get"), {"name": name}))

    def delete(self, names: list[str] | str) -> None:
        if isinstance(names, str):
            names = [names]
        self._client.api.post(self._path("delete"), {"names": list(names)}, timeout=120)

    def delete_instances(self, name: str, instance_nums: list[int]) -> Fleet:
        return Fleet.from_dict(
            self._client.api.post(
                self._path("delete_instances"), {"name": name, "instance_nums": list(instance_nums)}, timeout=120
            )
        )
