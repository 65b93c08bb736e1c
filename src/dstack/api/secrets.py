"""`client.secrets`: the project's secrets (for its admins and managers).

Configurations refer to them as `${{ secrets.NAME }}` in `env` values and `registry_auth`; the
server puts the value in only when it starts the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dstack.api.client import Client


@dataclass(frozen=True)
class Secret:
    """`value` is None except from `get` (`list` and `set` never carry it)."""

    id: str
    name: str
    value: str | None = None

    def __repr__(self) -> str:  # keep the value out of logs and tracebacks
        return f"Secret(name={self.name!r}, value={'***' if self.value is not None else None})"

    __str__ = __repr__

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Secret:
        return Secret(id=str(d.get("id", "")), name=d["name"], value=d.get("value"))


class SecretCollection:
    def __init__(self, client: Client) -> None:
        self._client = client

    def _path(self, action: str) -> str:
        return f"/api/project/{self._client.project}/secrets/{action}"

    def list(self) -> list[Secret]:
        """The project's secrets, by name, without values."""
        return [Secret.from_dict(d) for d in self._client.api.post(self._path("list"))]

    def get(self, name: str) -> Secret:
        """One secret with its value."""
        return Secret.from_dict(self._client.api.post(self._path("get"), {"name": name}))

    def create_or_update(self, name: str, value: str) -> Secret:
        """Set the secret's value (creating it when new); the answer carries no value."""
        return Secret.from_dict(self._client.api.post(self._path("create_or_update"), {"name": name, "value": value}))

    set = create_or_update

    def delete(self, names: list[str] | str) -> None:
        """Delete secrets: all of them, or none when one does not exist."""
        if isinstance(names, str):
            names = [names]
        self._client.api.post(self._path("delete"), {"secrets_names": list(names)})
