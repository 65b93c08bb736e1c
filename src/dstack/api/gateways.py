"""`client.gateways`: create, list, get and delete the project's gateways."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstack.api.client import Client


@dataclass(frozen=True)
class Gateway:
    """A gateway as the server reports it. `url` is the OpenAI-compatible endpoint's base
    (`https://gateway.<domain>[:port]`); services are at `https://<run>.<domain>[:port]/`."""

    name: str
    backend: str
    region: str | None
    hostname: str | None
    domain: str
    wildcard_domain: str
    port: int
    tls: bool
    default: bool
    status: str
    status_message: str | None = None
    url: str | None = None
    pid: int | None = None

    @staticmethod
    def from_dict(d: dict) -> Gateway:
        return Gateway(
            name=d["name"],
            backend=d.get("backend", "local"),
            region=d.get("region"),
            hostname=d.get("hostname"),
            domain=d["domain"],
            wildcard_domain=d.get("wildcard_domain", d["domain"]),
            port=int(d["port"]),
            tls=bool(d.get("tls")),
            default=bool(d.get("default")),
            status=d.get("status", "unknown"),
            status_message=d.get("status_message"),
            url=d.get("url"),
            pid=d.get("pid"),
        )


def _pem_or_path(path: str | os.PathLike | None) -> str | None:
    """A local file's PEM contents (what the server takes from every user); otherwise the
    absolute path, which the server reads on its own host for global admins only."""
    if not path:
        return None
    p = Path(path).expanduser().resolve()
    try:
        return p.read_text()
    except (OSError, UnicodeDecodeError):
        return str(p)


class GatewayCollection:
    def __init__(self, client: Client) -> None:
        self._client = client

    def _path(self, action: str) -> str:
        return f"/api/project/{self._client.project}/gateways/{action}"

    def create(
        self,
        name: str,
        domain: str,
        backend: str = "local",
        region: str | None = None,
        port: int | None = None,
        tls_cert: str | os.PathLike | None = None,
        tls_key: str | os.PathLike | None = None,
        default: bool = False,
        host: str | None = None,
    ) -> Gateway:
        """Start a gateway on the server's host serving `<run>.<domain>` (port 443 with TLS, else 80,
        unless given). The project's first gateway becomes its default; `default=True` makes this one it.
        The certificate and key are read here and sent as PEM (a file missing here is looked up on
        the server's host, for global admins only). Binding other than loopback is for global admins."""
        body: dict = {
            "name": name,
            "domain": domain,
            "backend": backend,
            "region": region,
            "port": port,
            "tls_cert": _pem_or_path(tls_cert),
            "tls_key": _pem_or_path(tls_key),
            "default": default,
        }
        if host:
            body["host"] = host
        return Gateway.from_dict(self._client.api.post(self._path("create"), body, timeout=120))

    def list(self) -> list[Gateway]:
        return [Gateway.from_dict(d) for d in self._client.api.post(self._path("list"))]

    def get(self, name: str) -> Gateway:
        return Gateway.from_dict(self._client.api.post(self._path("get"), {"name": name}))

    def set_default(self, name: str) -> Gateway:
        return Gateway.from_dict(self._client.api.post(self._path("set_default"), {"name": name}))

    def delete(self, names: list[str] | str) -> None:
        if isinstance(names, str):
            names = [names]
        self._client.api.post(self._path("delete"), {"names": list(names)}, timeout=60)
