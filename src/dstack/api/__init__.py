"""dstack's Python API: `Client`, the configuration classes, and `Run`.

Names load on first use, so commands that only read (like `dstack ps`) never pay for
building the configuration models.
"""

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Client": "dstack.api.client",
    "CompletionService": "dstack.api.completion",
    "CompletionTask": "dstack.api.completion",
    "Run": "dstack.api.runs",
    "RunCollection": "dstack.api.runs",
    "RepoCollection": "dstack.api.repos",
    "BackendCollection": "dstack.api.repos",
    "ClientError": "dstack.core.errors",
    "ServerClientError": "dstack.core.errors",
    "Task": "dstack.core.models.configurations",
    "Service": "dstack.core.models.configurations",
    "Serverless": "dstack.core.models.configurations",
    "TaskConfiguration": "dstack.core.models.configurations",
    "ServiceConfiguration": "dstack.core.models.configurations",
    "ServerlessConfiguration": "dstack.core.models.configurations",
    "Resources": "dstack.core.models.resources",
    "ResourcesSpec": "dstack.core.models.resources",
    "GPU": "dstack.core.models.resources",
    "GPUSpec": "dstack.core.models.resources",
    "RunStatus": "dstack.core.models.runs",
    "JobStatus": "dstack.core.models.runs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dstack.api' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from dstack.api.client import Client
    from dstack.api.completion import CompletionService, CompletionTask
    from dstack.api.repos import BackendCollection, RepoCollection
    from dstack.api.runs import Run, RunCollection
    from dstack.core.errors import ClientError, ServerClientError
    from dstack.core.models.configurations import (
        Serverless,
        ServerlessConfiguration,
        Service,
        ServiceConfiguration,
        Task,
        TaskConfiguration,
    )
    from dstack.core.models.resources import GPU, GPUSpec, Resources, ResourcesSpec
    from dstack.core.models.runs import JobStatus, RunStatus
