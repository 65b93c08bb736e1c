"""The RunPod worker protocol of an endpoint: `job-take` (long poll), `job-done`, `job-stream`,
`job-stop` (long poll of the stop channel) and `ping`, checked against the endpoint's worker
tokens. A late or foreign post changes nothing; a job is requeued only once its worker is lost."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dstack.core.tokens import bearer_token, hash_token
from dstack.serverless.errors import ErrorKind, ServerlessError
from dstack.serverless.models import COMPLETED, FAILED, IN_PROGRESS
from dstack.serverless.pool import INITIALIZING, READY, UNHEALTHY, Pool, _Worker, log


class WorkerProtocol:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def check_worker(self, endpoint_id: str, raw_authorization: str | None) -> None:
        """The endpoint's worker token: bare, as the SDK sends it, or as `Bearer <t>`."""
        ep = self.pool.ep(endpoint_id)
        if not raw_authorization:
            raise ServerlessError(
                ErrorKind.NOT_AUTHENTICATED, "missing worker token in the Authorization header", "not_authenticated"
            )
        digest = hash_token(bearer_token(raw_authorization, bare=True) or "")
        if not any(hmac.compare_digest(digest, h) for h in ep.token_hashes):
            raise ServerlessError(ErrorKind.FORBIDDEN, "invalid worker token for this endpoint", "forbidden")

    async def take(
        self, endpoint_id: str, worker_id: str, n: int, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> list[Any]:
        """Long poll: up to `n` jobs as soon as any is queued, [] after `take_wait`."""
        self.pool.ep(endpoint_id)
        w = await self.pool.touch(endpoint_id, worker_id)
        deadline = time.monotonic() + self.pool.options.take_wait
        while not self.pool.closing:
            if self._counted(w):
                rows = await self.pool.store.claim(endpoint_id, worker_id, max(1, n))
                if rows and not self._counted(w):
                    # Lost while the claim ran (missed heartbeats, a lost host): its requeue did
                    # not see these jobs yet, so they go back now instead of waiting on a worker
                    # nobody counts any more.
                    back = await self.pool.store.unclaim(worker_id, [r.id for r in rows])
                    self.pool.after_requeue(endpoint_id, back, [])
                    return []
                if rows:
                    w.last_busy = time.time()
                    return rows
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self.pool.notifier.wait("take:" + endpoint_id, min(remaining, self.pool.options.take_recheck))
            if is_disconnected is not None and await is_disconnected():
                break
            w = self.pool.workers.get(worker_id) or w
        return []

    def _counted(self, w: _Worker) -> bool:
        """The worker may be handed jobs: the pool counts it (this very record) and it is live."""
        return w.state in (READY, INITIALIZING) and self.pool.workers.get(w.worker_id) is w

    async def job_done(self, endpoint_id: str, worker_id: str, job_id: str, raw: bytes) -> None:
        """A result or a progress update; idempotent, and a late or foreign post changes nothing."""
        self.pool.ep(endpoint_id)
        data = _parse_object(raw)
        w = await self.pool.touch(endpoint_id, worker_id)
        if data.get("status") == IN_PROGRESS:
            if await self.pool.store.progress(job_id, worker_id, _dumps(data.get("output"))):
                self.pool.notifier.notify("job:" + job_id)
            return
        error = data.get("error")
        status = FAILED if error else COMPLETED
        error_text = None if not error else (error if isinstance(error, str) else _dumps(error))
        output_json = _dumps(data["output"]) if "output" in data else None
        done = await self.pool.store.finish(job_id, worker_id, status, output_json, error_text)
        if done is not None:
            w.last_busy = time.time()
            self.pool.finished([done])
            if done.displaced:  # a late result won: the worker running the job again can stop
                self.pool.send_stop(done.displaced, [job_id])
        if data.get("stopPod"):
            await self.pool.stop_worker(w, "the worker asked to be refreshed (stopPod)")

    async def job_stream(self, endpoint_id: str, worker_id: str, job_id: str, raw: bytes) -> None:
        self.pool.ep(endpoint_id)
        data = _parse_object(raw)
        await self.pool.touch(endpoint_id, worker_id)
        if "output" in data and await self.pool.store.add_chunk(job_id, worker_id, _dumps(data["output"])):
            self.pool.notifier.notify("job:" + job_id)

    async def job_stop(self, endpoint_id: str, worker_id: str) -> list[str]:
        """Long poll of the stop channel: ids of the worker's jobs that were cancelled or timed out."""
        self.pool.ep(endpoint_id)
        w = await self.pool.touch(endpoint_id, worker_id)
        if not w.stops:
            await self.pool.notifier.wait("stop:" + worker_id, self.pool.options.take_wait)
        w = self.pool.workers.get(worker_id) or w
        ids, w.stops = sorted(w.stops), set()
        return ids

    async def ping(
        self,
        endpoint_id: str,
        worker_id: str,
        job_ids: list[str],
        version: str | None,
        unhealthy_reason: str | None = None,
    ) -> None:
        """Heartbeat: liveness, and the only word on which jobs the worker still holds."""
        self.pool.ep(endpoint_id)
        w = await self.pool.touch(endpoint_id, worker_id)
        now = time.time()
        if unhealthy_reason is not None:
            await self.pool.lose_worker(w, UNHEALTHY, f"worker failed a fitness check: {unhealthy_reason}")
            return
        await self.pool.store.note_ping(worker_id, now, len(job_ids), version or "")
        held = set(job_ids)
        if held:
            w.last_busy = now
        mine = await self.pool.store.jobs_of_worker(worker_id)
        lost = [r.id for r in mine if r.id not in held and (r.started_at or now) < now - self.pool.options.lost_grace]
        if lost:
            requeued, failed = await self.pool.store.requeue(
                worker_id, self.pool.options.max_attempts, f"worker {worker_id} no longer holds the job", lost
            )
            log.info(
                "serverless: worker %s no longer holds %s; requeued %d, failed %d",
                worker_id,
                lost,
                len(requeued),
                len(failed),
            )
            self.pool.after_requeue(endpoint_id, requeued, failed)
        foreign = held - {r.id for r in mine}
        if foreign:
            rows = await self.pool.store.statuses(sorted(foreign))
            mine_now = {r.id for r in rows if r.status == IN_PROGRESS and r.worker_id == worker_id}
            self.pool.send_stop(worker_id, sorted(foreign - mine_now))


def _parse_object(raw: bytes) -> dict[str, Any]:
    """Workers send raw JSON under a form content-type: parse the body bytes ourselves."""
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise ServerlessError(ErrorKind.INVALID, "the body is not valid JSON", "invalid_request") from None
    if not isinstance(data, dict):
        raise ServerlessError(ErrorKind.INVALID, "the body must be a JSON object", "invalid_request")
    return data


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
