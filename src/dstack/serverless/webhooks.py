"""Webhooks: a finished job with a `webhook` URL gets its status object POSTed there; failed
deliveries are retried `webhook_attempts` times, `webhook_retry_delay` apart. Deliveries are rows
(`serverless_webhook_deliveries`), so a restart resumes them."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from dstack.serverless.pool import Pool, log


class WebhookSender:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self._http: httpx.AsyncClient | None = None
        self._hooks_inflight: set[int] = set()

    def open(self) -> None:
        self._http = httpx.AsyncClient(timeout=self.pool.options.webhook_timeout)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def run(self) -> None:
        """Deliver due webhooks, each in a task of its own; woken when a hooked job finishes."""
        o = self.pool.options
        while not self.pool.closing:
            try:
                self.pool.hook_kick.clear()
                for row in await self.pool.store.due_webhooks(self._hooks_inflight):
                    self._hooks_inflight.add(row.id)
                    self.pool.spawn(self._deliver(row))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("serverless: webhook loop step failed")
            try:
                await asyncio.wait_for(self.pool.hook_kick.wait(), min(o.tick, o.webhook_retry_delay))
            except TimeoutError:
                pass

    async def _deliver(self, row: Any) -> None:
        ok, error = False, None
        try:
            assert self._http is not None
            resp = await self._http.post(row.url, content=row.payload, headers={"Content-Type": "application/json"})
            ok = 200 <= resp.status_code < 300
            error = None if ok else f"HTTP {resp.status_code}"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        try:
            await self.pool.store.webhook_result(
                row.id,
                row.attempts + 1,
                ok,
                error,
                self.pool.options.webhook_attempts,
                self.pool.options.webhook_retry_delay,
            )
        finally:
            self._hooks_inflight.discard(row.id)
