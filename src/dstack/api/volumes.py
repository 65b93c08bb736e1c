"""`client.volumes`: the project's volumes (`type: volume`), which runs mount with `volumes:`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dstack.core.models.volumes import VolumeConfiguration

if TYPE_CHECKING:
    from dstack.api.client import Client


@dataclass(frozen=True)
class Volume:
    id: str
    name: str
    backend: str
    size_gb: float | None
    shared: bool
    external: bool
    created_at: str
    #: the size is a real limit (a filesystem image of that size); False: only recorded
    size_enforced: bool = False
    #: runs not yet finished that have it attached
    attached_to: list[str] = field(default_factory=list)
    #: `local`, or the fleet keeping an `ssh` volume
    region: str = "local"
    #: an `ssh` volume's host (its address in the fleet); None on `local`
    availability_zone: str | None = None

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Volume:
        prov = d.get("provisioning_data") or {}
        return Volume(
            id=str(d.get("id", "")),
            name=d["name"],
            backend=str(prov.get("backend") or (d.get("configuration") or {}).get("backend") or ""),
            size_gb=prov.get("size_gb"),
            shared=bool(d.get("shared")),
            external=bool(d.get("external")),
            created_at=str(d.get("created_at", "")),
            size_enforced=bool(d.get("size_enforced")),
            attached_to=list(d.get("attached_to") or []),
            region=str(prov.get("region") or "local"),
            availability_zone=prov.get("availability_zone"),
        )


class VolumeCollection:
    def __init__(self, client: Client) -> None:
        self._client = client

    def _path(self, action: str) -> str:
        return f"/api/project/{self._client.project}/volumes/{action}"

    def list(self) -> list[Volume]:
        return [Volume.from_dict(d) for d in self._client.api.post(self._path("list"))]

    def get(self, name: str) -> Volume:
        return Volume.from_dict(self._client.api.post(self._path("get"), {"name": name}))

    def create(self, configuration: VolumeConfiguration | dict[str, Any]) -> Volume:
        """Create the volume (applying the same configuration again answers the existing one)."""
        conf = configuration if isinstance(configuration, VolumeConfiguration) else VolumeConfiguration(**configuration)
        body = {"configuration": conf.model_dump(mode="json")}
        return Volume.from_dict(self._client.api.post(self._path("create"), body))

    apply = create

    def delete(self, names: list[str] | str) -> None:
        """Delete volumes and their data: all of them, or none when one is missing or attached to a run."""
        if isinstance(names, str):
            names = [names]
        self._client.api.post(self._path("delete"), {"names": list(names)})
