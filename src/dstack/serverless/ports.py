"""What the queue needs from whoever hosts it, as small interfaces: a database, a token check, the
name of a project, and a worker launcher (`launcher.py`). The server implements them
(`dstack.server.services.serverless_workers.server_ports`) and hands them in; nothing here imports
`dstack.server`, so the dependency runs one way (server -> serverless)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from dstack.proxy.auth import Access
from dstack.serverless.launcher import WorkerLauncher


class Database(Protocol):
    """The server's `Database` fits: an async engine, its sessions, and which dialect it is."""

    url: str
    is_sqlite: bool
    engine: AsyncEngine

    def session(self) -> AsyncSession: ...


class AccessCheck(Protocol):
    """May a token reach a project's endpoints? The server's `AuthCache` fits (the one the proxy
    uses too, so a token checked by either is remembered for both)."""

    async def check(self, project: str, token: str) -> Access: ...


@dataclass
class ServerPorts:
    database: Database
    launcher: WorkerLauncher
    access: AccessCheck
    #: the name of the project with this id (None when it is gone): endpoints are authorized by name
    project_name: Callable[[str], Awaitable[str | None]]
