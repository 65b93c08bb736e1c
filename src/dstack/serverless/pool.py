"""The endpoints and workers this server counts, and what changes them: registration, launches,
stops, exits, and the wake-ups that follow. The client API, the worker protocol, the scaler and
the webhook sender all act through one `Pool`.

State lives in the database (jobs, workers, webhook deliveries); memory only caches endpoint
settings and worker liveness, and both are rebuilt by `load()`, so a restarted server carries on
with the queue it left. Long polls are woken in-process (`KeyedNotifier`), never by polling the DB.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.core.notifier import KeyedNotifier
from dstack.core.tokens import hash_token
from dstack.serverless.errors import ErrorKind, ServerlessError
from dstack.serverless.models import ServerlessEndpointModel
from dstack.serverless.ports import ServerPorts
from dstack.serverless.queue import Finished, Store
from dstack.serverless.settings import EndpointSettings, ServiceOptions

log = logging.getLogger("dstack.serverless.service")

INITIALIZING, READY, UNHEALTHY, STOPPING = "initializing", "ready", "unhealthy", "stopping"
# The launcher reported the worker's end, but it was heard from less than `lost_grace` ago: it
# takes no new jobs, and the ones it holds wait until it has been silent that long (a report
# from a restarted agent or server can be wrong, and a live worker's jobs must not run twice).
EXITED = "exited"
MAX_TOKEN_HASHES = 8


@dataclass
class _Endpoint:
    endpoint_id: str
    project_id: str
    project_name: str
    run_id: str | None
    settings: EndpointSettings
    token: str
    token_hashes: list[str]
    # workers that ended before ever calling in (crash at start-up, no capacity, a bad command)
    # in a row: the next launch waits 1, 2, 4 ... 60 s instead of looping at the tick rate
    launch_failures: int = 0
    next_launch_at: float = 0.0


@dataclass
class _Worker:
    worker_id: str
    endpoint_id: str
    state: str
    created_at: float
    last_contact: float = 0.0
    last_busy: float = 0.0
    stop_requested_at: float = 0.0
    stops: set[str] = field(default_factory=set)  # job ids to hand out on the stop channel


class Pool:
    def __init__(self, ports: ServerPorts, base_url: str, options: ServiceOptions) -> None:
        self.ports = ports
        self.db = ports.database
        self.launcher = ports.launcher
        self.base_url = base_url.rstrip("/")
        self.options = options
        self.store = Store(ports.database)
        #: in-process wake-ups: "take:<endpoint>" job takers, "job:<id>" result waiters, "stop:<worker>" stop channels
        self.notifier: KeyedNotifier[str] = KeyedNotifier()
        self.endpoints: dict[str, _Endpoint] = {}
        self.workers: dict[str, _Worker] = {}
        self.refused: set[str] = set()  # uncounted workers that called in (logged once each)
        self.bg: set[asyncio.Future[Any]] = set()
        self.kick = asyncio.Event()  # wakes the scaler
        self.hook_kick = asyncio.Event()  # wakes the webhook sender
        self.closing = False
        self.started_at = time.time()

    async def load(self) -> None:
        """Endpoints and workers from the database (at start-up)."""
        self.started_at = time.time()
        self.closing = False
        async with self.db.session() as session:
            rows = (await session.execute(select(ServerlessEndpointModel))).scalars().all()
            for row in rows:
                await self.remember_endpoint(session, row, EndpointSettings.from_json(row.settings))
            await session.commit()
        for w in await self.store.load_workers():
            if w.endpoint_id in self.endpoints:
                self.workers[w.worker_id] = _Worker(
                    w.worker_id,
                    w.endpoint_id,
                    w.state,
                    w.created_at,
                    last_contact=w.last_ping_at or 0.0,
                    last_busy=self.started_at,
                    stop_requested_at=self.started_at if w.state in (STOPPING, UNHEALTHY) else 0.0,
                )

    # ---- endpoints -----------------------------------------------------------------------

    async def register_endpoint(
        self, session: AsyncSession, endpoint_id: str, project_id: str, run_id: str | None, settings: EndpointSettings
    ) -> None:
        """Create or update the endpoint row in the caller's session (the caller commits); workers
        for `settings.workers_min` start right after."""
        row = await session.get(ServerlessEndpointModel, endpoint_id)
        if row is None:
            row = ServerlessEndpointModel(
                endpoint_id=endpoint_id,
                project_id=project_id,
                run_id=run_id,
                settings=settings.to_json(),
                worker_token_hashes="[]",
                created_at=time.time(),
            )
            session.add(row)
        else:
            row.project_id, row.run_id, row.settings = project_id, run_id, settings.to_json()
        await self.remember_endpoint(session, row, settings)
        await session.flush()
        self.kick.set()

    async def remember_endpoint(
        self, session: AsyncSession, row: ServerlessEndpointModel, settings: EndpointSettings
    ) -> None:
        known = self.endpoints.get(row.endpoint_id)
        token = known.token if known else secrets.token_urlsafe(32)
        hashes = [h for h in json.loads(row.worker_token_hashes or "[]") if h != hash_token(token)]
        hashes = (hashes + [hash_token(token)])[-MAX_TOKEN_HASHES:]
        row.worker_token_hashes = json.dumps(hashes)
        project_name = await self.ports.project_name(row.project_id)
        self.endpoints[row.endpoint_id] = _Endpoint(
            row.endpoint_id,
            row.project_id,
            project_name or "",
            row.run_id,
            settings,
            token,
            hashes,
            known.launch_failures if known else 0,
            known.next_launch_at if known else 0.0,
        )

    async def deregister_endpoint(self, endpoint_id: str) -> None:
        """Stop the endpoint's workers and delete it with its jobs (the run is over)."""
        ep = self.endpoints.pop(endpoint_id, None)
        workers = [w for w in self.workers.values() if w.endpoint_id == endpoint_id]
        for w in workers:
            self.workers.pop(w.worker_id, None)
        await self.store.delete_endpoint(endpoint_id)
        self.notifier.notify("take:" + endpoint_id)
        if ep is not None:
            await asyncio.gather(*(self.call_launcher_stop(endpoint_id, w.worker_id) for w in workers))

    def worker_env(self, endpoint_id: str, worker_id: str) -> dict[str, str]:
        """The RUNPOD_* environment of one worker. Every URL carries a `?`: the SDK appends `&...`."""
        ep = self.ep(endpoint_id)
        base = f"{self.base_url}/v2/{endpoint_id}"
        env = {
            "RUNPOD_WEBHOOK_GET_JOB": f"{base}/job-take/$ID?src=dstack",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{base}/job-done/$RUNPOD_POD_ID/$ID?src=dstack",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{base}/job-stream/$RUNPOD_POD_ID/$ID?src=dstack",
            "RUNPOD_WEBHOOK_PING": f"{base}/ping/$RUNPOD_POD_ID?src=dstack",
            "RUNPOD_POD_ID": worker_id,
            "RUNPOD_AI_API_KEY": ep.token,
            "RUNPOD_ENDPOINT_ID": endpoint_id,
            "RUNPOD_PING_INTERVAL": str(int(self.options.ping_interval * 1000)),
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }
        env.update(self.options.extra_worker_env)
        return env

    async def endpoint_status(self, endpoint_id: str) -> dict[str, Any]:
        """Queue depth and workers by state, for `dstack ps` and `/health`."""
        self.ep(endpoint_id)
        counts = await self.store.counts(endpoint_id)
        workers, busy = await self.store.endpoint_workers(endpoint_id)
        by_state = {
            "idle": 0,
            "running": 0,
            "initializing": 0,
            "ready": 0,
            "throttled": 0,
            "unhealthy": 0,
            "stopping": 0,
        }
        for w in workers:
            if w.state == READY:
                by_state["running" if w.worker_id in busy else "idle"] += 1
                by_state["ready"] += 1
            elif w.state == EXITED:
                by_state[STOPPING] += 1
            else:
                by_state[w.state] = by_state.get(w.state, 0) + 1
        return {"jobs": counts, "workers": by_state}

    async def on_worker_exited(self, endpoint_id: str, worker_id: str, reason: str) -> None:
        """The launcher saw the worker process end: requeue its jobs and forget it; or, if the
        worker was heard from within `lost_grace` and holds jobs, park it as EXITED until it has
        been silent that long (`_check_workers`)."""
        w = self.workers.get(worker_id)
        ep = self.endpoints.get(endpoint_id)
        if ep is not None and w is not None and w.state == INITIALIZING:
            ep.launch_failures += 1
            ep.next_launch_at = time.time() + min(60.0, 2.0 ** (ep.launch_failures - 1))
            log.warning(
                "serverless: worker %s ended before calling in (%s); next launch in %.0f s",
                worker_id,
                reason,
                ep.next_launch_at - time.time(),
            )
        if w is not None and w.state == EXITED:
            return  # already waiting for its silence
        now = time.time()
        if (
            w is not None
            and now - self.heard(w) < self.options.lost_grace
            and await self.store.jobs_of_worker(worker_id)
        ):
            w.state, w.stop_requested_at = EXITED, now
            await self.store.set_worker_state(worker_id, EXITED, f"exited: {reason}")
            log.info(
                "serverless: worker %s reported exited (%s) but was heard from %.1f s ago; its jobs wait "
                "until it is silent for %.0f s",
                worker_id,
                reason,
                now - self.heard(w),
                self.options.lost_grace,
            )
            self.notifier.notify("take:" + endpoint_id)
            self.kick.set()
            return
        await self.forget_worker(endpoint_id, worker_id, reason)

    async def forget_worker(self, endpoint_id: str, worker_id: str, reason: str) -> None:
        """The worker is gone: requeue its jobs (FAILED past max_attempts) and drop it."""
        w = self.workers.pop(worker_id, None)
        requeued, failed = await self.store.requeue(
            worker_id, self.options.max_attempts, f"worker {worker_id} exited ({reason})"
        )
        log.info(
            "serverless: worker %s exited (%s); %d job(s) requeued, %d failed",
            worker_id,
            reason,
            len(requeued),
            len(failed),
        )
        await self.store.delete_worker(worker_id)
        self.after_requeue(endpoint_id, requeued, failed)
        if w is not None:
            self.notifier.notify("stop:" + worker_id)
        self.kick.set()

    def worker_ids(self) -> list[str]:
        """Workers the service believes are alive (for the launcher's exit sweep)."""
        return list(self.workers)

    def heard(self, w: _Worker) -> float:
        """When the worker was last heard from (its launch, or this process's start, at the earliest)."""
        return max(w.last_contact, w.created_at, self.started_at)

    def ep(self, endpoint_id: str) -> _Endpoint:
        ep = self.endpoints.get(endpoint_id)
        if ep is None:
            raise ServerlessError(ErrorKind.NOT_FOUND, f"endpoint '{endpoint_id}' does not exist", "not_found")
        return ep

    async def touch(self, endpoint_id: str, worker_id: str) -> _Worker:
        """Note contact from a worker. One this server does not count (reported exited and
        forgotten, or never launched here) is not adopted: it gets a stand-in that takes no jobs
        (its takes answer empty after the long poll), while a late result of its is still judged
        by the queue. Adopting it would hand work to a process no host reserved room for."""
        now = time.time()
        w = self.workers.get(worker_id)
        if w is None or w.endpoint_id != endpoint_id:
            if w is not None:
                raise ServerlessError(
                    ErrorKind.FORBIDDEN, f"worker '{worker_id}' belongs to another endpoint", "forbidden"
                )
            if worker_id not in self.refused:
                if len(self.refused) > 10_000:
                    self.refused.clear()
                self.refused.add(worker_id)
                log.warning(
                    "serverless: worker %s of %s is not counted here (exited or unknown): it gets no jobs",
                    worker_id,
                    endpoint_id,
                )
            return _Worker(worker_id, endpoint_id, STOPPING, now, now, now, stop_requested_at=now)
        elif w.state == INITIALIZING:
            w.state, w.last_busy = READY, now
            ep = self.endpoints.get(endpoint_id)
            if ep is not None:
                ep.launch_failures, ep.next_launch_at = 0, 0.0
            await self.store.set_worker_state(worker_id, READY, only_from=INITIALIZING)
        w.last_contact = now
        return w

    def finished(self, done: list[Finished]) -> None:
        for d in done:
            self.notifier.notify("job:" + d.id)
        if any(d.hooked for d in done):
            self.hook_kick.set()

    def after_requeue(self, endpoint_id: str, requeued: list[str], failed: list[Finished]) -> None:
        if requeued:
            self.notifier.notify("take:" + endpoint_id)
            self.kick.set()
        if failed:
            self.finished(failed)

    def send_stop(self, worker_id: str, job_ids: list[str]) -> None:
        w = self.workers.get(worker_id)
        if w is not None and job_ids:
            w.stops.update(job_ids)
            self.notifier.notify("stop:" + worker_id)

    async def launch(self, ep: _Endpoint) -> None:
        worker_id = f"{ep.endpoint_id}-{uuid.uuid4().hex[:8]}"
        now = time.time()
        await self.store.add_worker(worker_id, ep.endpoint_id, INITIALIZING, now)
        self.workers[worker_id] = _Worker(worker_id, ep.endpoint_id, INITIALIZING, now, now, now)
        log.info("serverless: starting worker %s", worker_id)
        env = self.worker_env(ep.endpoint_id, worker_id)
        try:
            await self.launcher.start_worker(ep.endpoint_id, worker_id, env)
        except Exception as e:  # a failed launch must not stall the loop; the next tick retries
            log.exception("serverless: starting worker %s failed", worker_id)
            await self.on_worker_exited(ep.endpoint_id, worker_id, f"launch failed: {e}")

    async def stop_worker(self, w: _Worker, reason: str, state: str = STOPPING) -> None:
        if w.state in (STOPPING, UNHEALTHY) and w.stop_requested_at:
            return
        w.state, w.stop_requested_at = state, time.time()
        log.info("serverless: stopping worker %s (%s): %s", w.worker_id, state, reason)
        await self.store.set_worker_state(w.worker_id, state, reason)
        self.notifier.notify("take:" + w.endpoint_id)
        self.spawn(self.call_launcher_stop(w.endpoint_id, w.worker_id))

    async def lose_worker(self, w: _Worker, state: str, reason: str) -> None:
        requeued, failed = await self.store.requeue(w.worker_id, self.options.max_attempts, reason)
        log.info(
            "serverless: lost worker %s: %s; %d job(s) requeued, %d failed",
            w.worker_id,
            reason,
            len(requeued),
            len(failed),
        )
        self.after_requeue(w.endpoint_id, requeued, failed)
        await self.stop_worker(w, reason, state)

    async def workers_lost(self, worker_ids: list[str], reason: str) -> None:
        """The server lost these workers' host (a faster signal than their missed heartbeats):
        requeue the jobs they hold now, stop counting them (the scaler starts replacements) and
        stop their jobs for when the host comes back. A result one of them posts late is judged
        by the queue like any other: the first result of a job wins."""
        for worker_id in worker_ids:
            w = self.workers.get(worker_id)
            if w is None:
                continue
            if w.state == EXITED:
                await self.forget_worker(w.endpoint_id, worker_id, reason)
            elif w.state in (INITIALIZING, READY) or await self.store.jobs_of_worker(worker_id):
                await self.lose_worker(w, UNHEALTHY, reason)

    async def call_launcher_stop(self, endpoint_id: str, worker_id: str) -> None:
        try:
            await self.launcher.stop_worker(endpoint_id, worker_id)
        except Exception:
            log.exception("serverless: stopping worker %s failed", worker_id)

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run `coro` in the background; `ServerlessService.stop` cancels what is left."""
        task = asyncio.ensure_future(coro)
        self.bg.add(task)
        task.add_done_callback(self.bg.discard)
