"""`Client`: the entry point of the Python API. It talks to the server over HTTP only."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from dstack.api._http import APIClient
from dstack.api.config import get_project
from dstack.core.errors import ClientError

if TYPE_CHECKING:
    from dstack.api.fleets import FleetCollection
    from dstack.api.gateways import GatewayCollection
    from dstack.api.metrics import MetricsCollection
    from dstack.api.repos import BackendCollection, RepoCollection
    from dstack.api.runs import RunCollection
    from dstack.api.secrets import SecretCollection
    from dstack.api.volumes import VolumeCollection


class Client:
    """The collections load on first use: read-only CLI commands never import the models."""

    def __init__(self, api: APIClient, project_name: str) -> None:
        self.api = api
        self.project = project_name

    @cached_property
    def runs(self) -> RunCollection:
        from dstack.api.runs import RunCollection

        return RunCollection(self)

    @cached_property
    def repos(self) -> RepoCollection:
        from dstack.api.repos import RepoCollection

        return RepoCollection(self)

    @cached_property
    def backends(self) -> BackendCollection:
        from dstack.api.repos import BackendCollection

        return BackendCollection(self)

    @cached_property
    def gateways(self) -> GatewayCollection:
        from dstack.api.gateways import GatewayCollection

        return GatewayCollection(self)

    @cached_property
    def fleets(self) -> FleetCollection:
        from dstack.api.fleets import FleetCollection

        return FleetCollection(self)

    @cached_property
    def secrets(self) -> SecretCollection:
        from dstack.api.secrets import SecretCollection

        return SecretCollection(self)

    @cached_property
    def metrics(self) -> MetricsCollection:
        from dstack.api.metrics import MetricsCollection

        return MetricsCollection(self)

    @cached_property
    def volumes(self) -> VolumeCollection:
        from dstack.api.volumes import VolumeCollection

        return VolumeCollection(self)

    @property
    def project_name(self) -> str:
        return self.project

    @staticmethod
    def from_config(
        project_name: str | None = None,
        server_url: str | None = None,
        user_token: str | None = None,
        ssh_identity_file=None,
    ) -> Client:
        """Connect with ~/.dstack/config.yml (or explicit url/token); `ClientError` if the server is down."""
        if server_url and user_token:
            url, token, project = server_url, user_token, project_name or "main"
        else:
            cfg = get_project(project_name)
            if cfg is None:
                raise ClientError(
                    "no dstack project is configured: start the server with `dstack server` "
                    "(it writes ~/.dstack/config.yml) or run `dstack config --url URL --project P --token T`"
                )
            url, token, project = cfg.url, cfg.token, cfg.name
        api = APIClient(url, token)
        api.post("/api/users/get_my_user")  # reachable and the token works
        return Client(api, project)
