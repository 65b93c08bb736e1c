"""The scaler: how many workers an endpoint should have (`desired_workers`, kept pure so it can be
tested without processes) and the control loop that acts on it: execution timeouts, workers that
went silent, launches and idle stops, and the expiry of old results."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from dstack.serverless.models import IN_PROGRESS
from dstack.serverless.pool import EXITED, INITIALIZING, READY, STOPPING, UNHEALTHY, Pool, _Endpoint, log
from dstack.serverless.settings import EndpointSettings


@dataclass
class QueueSnapshot:
    queued: int  # normal-priority jobs waiting (low priority never triggers scaling)
    in_progress: int  # normal-priority jobs running
    oldest_wait: float  # seconds the oldest normal job has waited; 0 when none
    live: int  # workers initializing or ready
    initializing: int


def desired_workers(s: EndpointSettings, q: QueueSnapshot) -> int:
    """How many live workers the endpoint should have now. Scale-down happens only through the
    idle timeout, so this is a floor for starting workers, never a reason to stop a busy one."""
    want = s.workers_min
    if s.scaler_type == "request_count":
        want = max(want, s.desired_by_request_count(q.queued + q.in_progress))
    elif q.queued > 0 and q.live > 0 and q.initializing == 0 and q.oldest_wait > s.scaler_value:
        want = max(want, q.live + 1)
    if q.queued > 0:
        want = max(want, 1)  # the first job at zero workers starts one at once
    return min(want, s.workers_max)


class Scaler:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def run(self) -> None:
        """Every tick (or at once when kicked): timeouts, worker health, scaling, expiry."""
        last_expiry = 0.0
        while not self.pool.closing:
            try:
                self.pool.kick.clear()
                await self._timeouts()
                for ep in list(self.pool.endpoints.values()):
                    await self._check_workers(ep)
                    await self._scale(ep)
                if time.time() - last_expiry > 2 * self.pool.options.tick:
                    last_expiry = time.time()
                    await self._expire()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("serverless: control loop step failed")
            try:
                await asyncio.wait_for(self.pool.kick.wait(), self.pool.options.tick)
            except TimeoutError:
                pass

    async def _timeouts(self) -> None:
        done = await self.pool.store.time_out()
        if not done:
            return
        self.pool.finished(done)
        for d in done:
            if d.worker_id:
                self.pool.send_stop(d.worker_id, [d.id])
                w = self.pool.workers.get(d.worker_id)
                if w is not None:  # a handler past its timeout may be stuck (sync): replace the worker
                    await self.pool.stop_worker(w, f"job {d.id} exceeded its execution timeout")

    async def _expire(self) -> None:
        for row in await self.pool.store.expire(self.pool.options.retention):
            self.pool.notifier.notify("job:" + row.id)
            if row.status == IN_PROGRESS and row.worker_id:
                self.pool.send_stop(row.worker_id, [row.id])

    async def _check_workers(self, ep: _Endpoint) -> None:
        now = time.time()
        o = self.pool.options
        for w in [w for w in self.pool.workers.values() if w.endpoint_id == ep.endpoint_id]:
            contact = self.pool.heard(w)
            if w.state == EXITED:
                if now - contact >= o.lost_grace:
                    await self.pool.forget_worker(
                        ep.endpoint_id, w.worker_id, f"exited and silent for {now - contact:.0f} s"
                    )
                elif not await self.pool.store.jobs_of_worker(w.worker_id):
                    await self.pool.forget_worker(ep.endpoint_id, w.worker_id, "exited, and its jobs are done")
            elif w.state == INITIALIZING and now - contact > o.init_timeout:
                await self.pool.lose_worker(w, UNHEALTHY, f"worker did not call in within {o.init_timeout:.0f} s")
            elif w.state == READY and now - contact > o.heartbeat_deadline:
                await self.pool.lose_worker(w, UNHEALTHY, f"no heartbeat for {now - contact:.0f} s")
            elif (
                w.state in (STOPPING, UNHEALTHY) and now - max(w.stop_requested_at, contact) > o.heartbeat_deadline + 30
            ):
                await self.pool.on_worker_exited(ep.endpoint_id, w.worker_id, "stopped and silent")

    async def _scale(self, ep: _Endpoint) -> None:
        now = time.time()
        q = await self.pool.store.queue_counts(ep.endpoint_id)
        busy = q.busy_workers
        workers = [w for w in self.pool.workers.values() if w.endpoint_id == ep.endpoint_id]
        live = [w for w in workers if w.state in (INITIALIZING, READY)]
        for w in live:
            if w.worker_id in busy:
                w.last_busy = now
        oldest = q.oldest_queued_at
        snap = QueueSnapshot(
            q.queued,
            q.running,
            now - oldest if oldest else 0.0,
            len(live),
            sum(1 for w in live if w.state == INITIALIZING),
        )
        want = desired_workers(ep.settings, snap)
        for _ in range(want - len(live)):
            if time.time() < ep.next_launch_at:
                break
            await self.pool.launch(ep)
        excess = len(live) - max(ep.settings.workers_min, want if ep.settings.scaler_type == "request_count" else 0)
        if excess <= 0 or q.queued_any:
            return
        for w in sorted((w for w in live if w.state == READY), key=lambda w: w.last_busy):
            if excess <= 0:
                break
            if w.worker_id not in busy and now - w.last_busy > ep.settings.idle_timeout:
                await self.pool.stop_worker(w, f"idle for {ep.settings.idle_timeout:g} s")
                excess -= 1
