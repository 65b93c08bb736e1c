"""dstack's Python API: `Client`, the configuration classes, and `Run`."""

from dstack.api.client import Client
from dstack.api.runs import Run, RunCollection
from dstack.api.repos import BackendCollection, RepoCollection
from dstack.core.errors import ClientError, ServerClientError
from dstack.core.models.configurations import (
    Service,
    ServiceConfiguration,
    Serverless,
    ServerlessConfiguration,
    Task,
    TaskConfiguration,
)
from dstack.core.models.resources import GPU, GPUSpec, Resources, ResourcesSpec
from dstack.core.models.runs import JobStatus, RunStatus

__all__ = [
    "Client", "ClientError", "ServerClientError", "Run", "RunCollection", "RepoCollection", "BackendCollection",
    "Task", "Service", "Serverless", "TaskConfiguration", "ServiceConfiguration", "ServerlessConfiguration",
    "Resources", "ResourcesSpec", "GPU", "GPUSpec", "RunStatus", "JobStatus",
]
