"""ServerlessService: the queue's parts put together, with their lifecycle.

- `Pool` (`pool.py`): the endpoints and workers this server counts, and what changes them;
- `ClientApi` (`client_api.py`): the RunPod client API;
- `WorkerProtocol` (`worker_protocol.py`): what workers call;
- `Scaler` (`scaler.py`): timeouts, worker health, launches and idle stops;
- `WebhookSender` (`webhooks.py`): deliveries of finished jobs' webhooks.

The server hands everything the queue needs from it in as `ServerPorts` (`ports.py`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from dstack.serverless.client_api import ClientApi
from dstack.serverless.pool import Pool
from dstack.serverless.ports import ServerPorts
from dstack.serverless.scaler import Scaler
from dstack.serverless.settings import EndpointSettings, ServiceOptions
from dstack.serverless.webhooks import WebhookSender
from dstack.serverless.worker_protocol import WorkerProtocol


class ServerlessService:
    def __init__(self, ports: ServerPorts, base_url: str, options: ServiceOptions | None = None) -> None:
        self.pool = Pool(ports, base_url, options or ServiceOptions())
        self.options = self.pool.options
        self.client = ClientApi(self.pool)
        self.worker = WorkerProtocol(self.pool)
        self.scaler = Scaler(self.pool)
        self.webhooks = WebhookSender(self.pool)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def closing(self) -> bool:
        return self.pool.closing

    async def start(self) -> None:
        """Load endpoints and workers from the database and start the background loops."""
        self.webhooks.open()
        await self.pool.load()
        self._tasks = [asyncio.create_task(self.scaler.run()), asyncio.create_task(self.webhooks.run())]

    async def stop(self) -> None:
        """Stop the loops and release long polls. Workers keep running: they are jobs of the run."""
        pool = self.pool
        pool.closing = True
        pool.notifier.notify_all()
        for task in [*self._tasks, *pool.bg]:
            task.cancel()
        await asyncio.gather(*self._tasks, *pool.bg, return_exceptions=True)
        self._tasks.clear()
        await self.webhooks.close()
        await pool.store.close()

    # ---- what the server calls -------------------------------------------------------------

    async def register_endpoint(
        self, session: AsyncSession, endpoint_id: str, project_id: str, run_id: str | None, settings: EndpointSettings
    ) -> None:
        await self.pool.register_endpoint(session, endpoint_id, project_id, run_id, settings)

    async def deregister_endpoint(self, endpoint_id: str) -> None:
        await self.pool.deregister_endpoint(endpoint_id)

    async def on_worker_exited(self, endpoint_id: str, worker_id: str, reason: str) -> None:
        await self.pool.on_worker_exited(endpoint_id, worker_id, reason)

    async def endpoint_status(self, endpoint_id: str) -> dict[str, Any]:
        return await self.pool.endpoint_status(endpoint_id)

    def worker_env(self, endpoint_id: str, worker_id: str) -> dict[str, str]:
        return self.pool.worker_env(endpoint_id, worker_id)

    def worker_ids(self) -> list[str]:
        return self.pool.worker_ids()
