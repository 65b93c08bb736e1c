"""ServerlessService: owns endpoints, workers and the background loops around the job queue.

State lives in the database (jobs, workers, webhook deliveries); memory only caches endpoint
settings and worker liveness, and both are rebuilt by `start()`, so a restarted server carries on
with the queue it left. Long polls are woken in-process (`Signals`), never by polling the DB.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.server.db import Database
from dstack.server.models import ProjectModel
from dstack.server.security import authenticate, hash_token, project_for_member
from dstack.serverless.launcher import WorkerLauncher
from dstack.serverless.models import (
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    IN_QUEUE,
    TERMINAL,
    ServerlessEndpointModel,
)
from dstack.serverless.queue import Finished, Store, status_object
from dstack.serverless.scaler import QueueSnapshot, desired_workers
from dstack.serverless.settings import EndpointSettings, ServiceOptions
from dstack.serverless.signals import Signals

log = logging.getLogger(__name__)


INITIALIZING, READY, UNHEALTHY, STOPPING = "initializing", "ready", "unhealthy", "stopping"
# The launcher reported the worker's end, but it was heard from less than `lost_grace` ago: it
# takes no new jobs, and the ones it holds wait until it has been silent that long (a report
# from a restarted agent or server can be wrong, and a live worker's jobs must not run twice).
EXITED = "exited"
MAX_TOKEN_HASHES = 8


class ServerlessError(Exception):
    """An error with an HTTP status, raised to the router."""

    def __init__(self, status: int, msg: str, code: str) -> None:
        super().__init__(msg)
        self.status, self.msg, self.code = status, msg, code


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


class ServerlessService:
    def __init__(
        self, database: Database, launcher: WorkerLauncher, base_url: str, options: ServiceOptions | None = None
    ) -> None:
        self.db = database
        self.launcher = launcher
        self.base_url = base_url.rstrip("/")
        self.options = options or ServiceOptions()
        self.store = Store(database)
        self.signals = Signals()
        self._endpoints: dict[str, _Endpoint] = {}
        self._workers: dict[str, _Worker] = {}
        self._refused: set[str] = set()  # uncounted workers that called in (logged once each)
        self._auth_cache: dict[tuple[str, str], float] = {}
        self._tasks: list[asyncio.Task] = []
        self._bg: set[asyncio.Task] = set()
        self._kick = asyncio.Event()
        self._hook_kick = asyncio.Event()
        self._hooks_inflight: set[int] = set()
        self._http: httpx.AsyncClient | None = None
        self._closing = False
        self._started_at = time.time()

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Load endpoints and workers from the database and start the background loops."""
        self._started_at = time.time()
        self._closing = False
        self._http = httpx.AsyncClient(timeout=self.options.webhook_timeout)
        async with self.db.session() as session:
            rows = (await session.execute(select(ServerlessEndpointModel))).scalars().all()
            for row in rows:
                await self._remember_endpoint(session, row, EndpointSettings.from_json(row.settings))
            await session.commit()
        for w in await self.store.load_workers():
            if w.endpoint_id in self._endpoints:
                self._workers[w.worker_id] = _Worker(
                    w.worker_id,
                    w.endpoint_id,
                    w.state,
                    w.created_at,
                    last_contact=w.last_ping_at or 0.0,
                    last_busy=self._started_at,
                    stop_requested_at=self._started_at if w.state in (STOPPING, UNHEALTHY) else 0.0,
                )
        self._tasks = [asyncio.create_task(self._control_loop()), asyncio.create_task(self._webhook_loop())]

    async def stop(self) -> None:
        """Stop the loops and release long polls. Workers keep running: they are jobs of the run."""
        self._closing = True
        self.signals.fire_all()
        for task in self._tasks + list(self._bg):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._bg, return_exceptions=True)
        self._tasks.clear()
        if self._http is not None:
            await self._http.aclose()
        await self.store.close()

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
        await self._remember_endpoint(session, row, settings)
        await session.flush()
        self._kick.set()

    async def _remember_endpoint(
        self, session: AsyncSession, row: ServerlessEndpointModel, settings: EndpointSettings
    ) -> None:
        known = self._endpoints.get(row.endpoint_id)
        token = known.token if known else secrets.token_urlsafe(32)
        hashes = [h for h in json.loads(row.worker_token_hashes or "[]") if h != hash_token(token)]
        hashes = (hashes + [hash_token(token)])[-MAX_TOKEN_HASHES:]
        row.worker_token_hashes = json.dumps(hashes)
        project = await session.get(ProjectModel, row.project_id)
        self._endpoints[row.endpoint_id] = _Endpoint(
            row.endpoint_id,
            row.project_id,
            project.name if project else "",
            row.run_id,
            settings,
            token,
            hashes,
            known.launch_failures if known else 0,
            known.next_launch_at if known else 0.0,
        )

    async def deregister_endpoint(self, endpoint_id: str) -> None:
        """Stop the endpoint's workers and delete it with its jobs (the run is over)."""
        ep = self._endpoints.pop(endpoint_id, None)
        workers = [w for w in self._workers.values() if w.endpoint_id == endpoint_id]
        for w in workers:
            self._workers.pop(w.worker_id, None)
        await self.store.delete_endpoint(endpoint_id)
        self.signals.fire("take:" + endpoint_id)
        if ep is not None:
            await asyncio.gather(*(self._call_launcher_stop(endpoint_id, w.worker_id) for w in workers))

    def worker_env(self, endpoint_id: str, worker_id: str) -> dict[str, str]:
        """The RUNPOD_* environment of one worker. Every URL carries a `?`: the SDK appends `&...`."""
        ep = self._ep(endpoint_id)
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
        self._ep(endpoint_id)
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

    # ---- client API ------------------------------------------------------------------------

    async def authorize(self, endpoint_id: str, token: str | None) -> None:
        """A user token of a member of the endpoint's project (cached briefly: /run is hot)."""
        if not token:
            raise ServerlessError(401, "missing Authorization: Bearer <token> header", "not_authenticated")
        key = (hash_token(token), endpoint_id)
        now = time.monotonic()
        if self._auth_cache.get(key, 0) > now:
            return
        ep = self._endpoints.get(endpoint_id)
        async with self.db.session() as session:
            user = await authenticate(session, token)
            if user is None:
                raise ServerlessError(401, "invalid or revoked token", "not_authenticated")
            project = await project_for_member(session, user, ep.project_name) if ep else None
        if ep is None or project is None or project.id != ep.project_id:
            raise ServerlessError(
                404, f"endpoint '{endpoint_id}' does not exist or you are not a member of its project", "not_found"
            )
        if len(self._auth_cache) > 10_000:
            self._auth_cache.clear()
        self._auth_cache[key] = now + self.options.auth_cache_ttl

    async def submit(self, endpoint_id: str, body: Any) -> str:
        ep = self._ep(endpoint_id)
        if not isinstance(body, dict) or "input" not in body:
            raise ServerlessError(400, "the body must be a JSON object with an 'input' field", "invalid_request")
        webhook = body.get("webhook")
        if webhook is not None and (not isinstance(webhook, str) or not webhook.startswith(("http://", "https://"))):
            raise ServerlessError(400, "'webhook' must be an http(s) URL", "invalid_request")
        policy = body.get("policy") or {}
        if not isinstance(policy, dict):
            raise ServerlessError(400, "'policy' must be an object", "invalid_request")
        timeout_ms = _positive_int(policy, "executionTimeout", int(ep.settings.execution_timeout * 1000))
        ttl_ms = _positive_int(policy, "ttl", self.options.default_ttl_ms)
        low = policy.get("lowPriority", False)
        if not isinstance(low, bool):
            raise ServerlessError(400, "'policy.lowPriority' must be a boolean", "invalid_request")
        input_json = json.dumps(body["input"], separators=(",", ":"))
        job_id = await self.store.submit(endpoint_id, input_json, webhook, timeout_ms, ttl_ms, low)
        self.signals.fire("take:" + endpoint_id)
        if not low and not any(
            w.endpoint_id == endpoint_id and w.state in (INITIALIZING, READY) for w in self._workers.values()
        ):
            self._kick.set()  # cold start: don't wait for the next tick
        return job_id

    async def run_sync(self, endpoint_id: str, body: Any, wait_ms: int | None) -> dict[str, Any]:
        wait = (
            min(wait_ms if wait_ms is not None else self.options.runsync_default_ms, self.options.runsync_max_ms) / 1000
        )
        deadline = time.monotonic() + max(0.0, wait)
        job_id = await self.submit(endpoint_id, body)
        while True:
            remaining = deadline - time.monotonic()
            fired = await self.signals.wait("job:" + job_id, min(remaining, 1.0))
            row = await self.store.get(endpoint_id, job_id)
            if row is None or row.status in TERMINAL or (not fired and deadline - time.monotonic() <= 0):
                break
        if row is None:
            return {"id": job_id, "status": "IN_QUEUE"}
        return status_object(row)

    async def status(self, endpoint_id: str, job_id: str) -> dict[str, Any]:
        self._ep(endpoint_id)
        row = await self.store.get(endpoint_id, job_id)
        if row is None:
            raise ServerlessError(404, f"job '{job_id}' not found (it may have expired)", "not_found")
        return status_object(row)

    async def stream(self, endpoint_id: str, job_id: str) -> dict[str, Any]:
        self._ep(endpoint_id)
        got = await self.store.take_stream(endpoint_id, job_id)
        if got is None:
            raise ServerlessError(404, f"job '{job_id}' not found (it may have expired)", "not_found")
        row, chunks = got
        body = status_object(row)
        body.pop("output", None)
        body["stream"] = [{"output": json.loads(c)} for c in chunks]
        return body

    async def wait_job(self, job_id: str, timeout: float) -> None:
        """Until the job changes (a chunk, progress, a final state) or `timeout`."""
        await self.signals.wait("job:" + job_id, timeout)

    async def cancel(self, endpoint_id: str, job_id: str) -> dict[str, Any]:
        self._ep(endpoint_id)
        row, done = await self.store.cancel(endpoint_id, job_id)
        if row is None:
            raise ServerlessError(404, f"job '{job_id}' not found (it may have expired)", "not_found")
        if done is None:
            return {"id": job_id, "status": row.status}
        self._finished([done])
        if row.status == IN_PROGRESS and row.worker_id:
            self._send_stop(row.worker_id, [job_id])
        return {"id": job_id, "status": done.status}

    async def retry(self, endpoint_id: str, job_id: str) -> dict[str, Any]:
        self._ep(endpoint_id)
        old = await self.store.retry(endpoint_id, job_id)
        if old is None:
            raise ServerlessError(404, f"job '{job_id}' not found (it may have expired)", "not_found")
        if old not in (FAILED, "TIMED_OUT"):
            raise ServerlessError(
                400, f"only FAILED or TIMED_OUT jobs can be retried; job '{job_id}' is {old}", "invalid_state"
            )
        self.signals.fire("take:" + endpoint_id)
        self._kick.set()
        return {"id": job_id, "status": IN_QUEUE}

    async def purge(self, endpoint_id: str) -> dict[str, Any]:
        self._ep(endpoint_id)
        return {"removed": await self.store.purge(endpoint_id), "status": "completed"}

    async def health(self, endpoint_id: str) -> dict[str, Any]:
        st = await self.endpoint_status(endpoint_id)
        jobs = st["jobs"]
        return {
            "jobs": {k: jobs[k] for k in ("completed", "failed", "inProgress", "inQueue", "retried")},
            "workers": st["workers"],
        }

    # ---- worker protocol -------------------------------------------------------------------

    def check_worker(self, endpoint_id: str, raw_authorization: str | None) -> None:
        ep = self._ep(endpoint_id)
        if not raw_authorization:
            raise ServerlessError(401, "missing worker token in the Authorization header", "not_authenticated")
        token = raw_authorization.strip()
        if token.lower().startswith("bearer "):
            token = token[7:].strip()
        digest = hash_token(token)
        if not any(hmac.compare_digest(digest, h) for h in ep.token_hashes):
            raise ServerlessError(403, "invalid worker token for this endpoint", "forbidden")

    async def take(
        self, endpoint_id: str, worker_id: str, n: int, is_disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> list[Any]:
        """Long poll: up to `n` jobs as soon as any is queued, [] after `take_wait`."""
        self._ep(endpoint_id)
        w = await self._touch(endpoint_id, worker_id)
        deadline = time.monotonic() + self.options.take_wait
        while not self._closing:
            if w.state in (READY, INITIALIZING) and self._workers.get(worker_id) is w:
                rows = await self.store.claim(endpoint_id, worker_id, max(1, n))
                if rows:
                    w.last_busy = time.time()
                    return rows
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await self.signals.wait("take:" + endpoint_id, min(remaining, self.options.take_recheck))
            if is_disconnected is not None and await is_disconnected():
                break
            w = self._workers.get(worker_id) or w
        return []

    async def job_done(self, endpoint_id: str, worker_id: str, job_id: str, raw: bytes) -> None:
        """A result or a progress update; idempotent, and a late or foreign post changes nothing."""
        self._ep(endpoint_id)
        data = _parse_object(raw)
        w = await self._touch(endpoint_id, worker_id)
        if data.get("status") == IN_PROGRESS:
            if await self.store.progress(job_id, worker_id, _dumps(data.get("output"))):
                self.signals.fire("job:" + job_id)
            return
        error = data.get("error")
        status = FAILED if error else COMPLETED
        error_text = None if not error else (error if isinstance(error, str) else _dumps(error))
        output_json = _dumps(data["output"]) if "output" in data else None
        done = await self.store.finish(job_id, worker_id, status, output_json, error_text)
        if done is not None:
            w.last_busy = time.time()
            self._finished([done])
            if done.displaced:  # a late result won: the worker running the job again can stop
                self._send_stop(done.displaced, [job_id])
        if data.get("stopPod"):
            await self._stop_worker(w, "the worker asked to be refreshed (stopPod)")

    async def job_stream(self, endpoint_id: str, worker_id: str, job_id: str, raw: bytes) -> None:
        self._ep(endpoint_id)
        data = _parse_object(raw)
        await self._touch(endpoint_id, worker_id)
        if "output" in data and await self.store.add_chunk(job_id, worker_id, _dumps(data["output"])):
            self.signals.fire("job:" + job_id)

    async def job_stop(self, endpoint_id: str, worker_id: str) -> list[str]:
        """Long poll of the stop channel: ids of the worker's jobs that were cancelled or timed out."""
        self._ep(endpoint_id)
        w = await self._touch(endpoint_id, worker_id)
        if not w.stops:
            await self.signals.wait("stop:" + worker_id, self.options.take_wait)
        w = self._workers.get(worker_id) or w
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
        self._ep(endpoint_id)
        w = await self._touch(endpoint_id, worker_id)
        now = time.time()
        if unhealthy_reason is not None:
            await self._lose_worker(w, UNHEALTHY, f"worker failed a fitness check: {unhealthy_reason}")
            return
        await self.store.note_ping(worker_id, now, len(job_ids), version or "")
        held = set(job_ids)
        if held:
            w.last_busy = now
        mine = await self.store.jobs_of_worker(worker_id)
        lost = [r.id for r in mine if r.id not in held and (r.started_at or now) < now - self.options.lost_grace]
        if lost:
            requeued, failed = await self.store.requeue(
                worker_id, self.options.max_attempts, f"worker {worker_id} no longer holds the job", lost
            )
            log.info(
                "serverless: worker %s no longer holds %s; requeued %d, failed %d",
                worker_id,
                lost,
                len(requeued),
                len(failed),
            )
            self._after_requeue(endpoint_id, requeued, failed)
        foreign = held - {r.id for r in mine}
        if foreign:
            rows = await self.store.statuses(sorted(foreign))
            mine_now = {r.id for r in rows if r.status == IN_PROGRESS and r.worker_id == worker_id}
            self._send_stop(worker_id, sorted(foreign - mine_now))

    async def on_worker_exited(self, endpoint_id: str, worker_id: str, reason: str) -> None:
        """The launcher saw the worker process end: requeue its jobs and forget it; or, if the
        worker was heard from within `lost_grace` and holds jobs, park it as EXITED until it has
        been silent that long (`_check_workers`)."""
        w = self._workers.get(worker_id)
        ep = self._endpoints.get(endpoint_id)
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
            and now - self._heard(w) < self.options.lost_grace
            and await self.store.jobs_of_worker(worker_id)
        ):
            w.state, w.stop_requested_at = EXITED, now
            await self.store.set_worker_state(worker_id, EXITED, f"exited: {reason}")
            log.info(
                "serverless: worker %s reported exited (%s) but was heard from %.1f s ago; its jobs wait "
                "until it is silent for %.0f s",
                worker_id,
                reason,
                now - self._heard(w),
                self.options.lost_grace,
            )
            self.signals.fire("take:" + endpoint_id)
            self._kick.set()
            return
        await self._forget_worker(endpoint_id, worker_id, reason)

    async def _forget_worker(self, endpoint_id: str, worker_id: str, reason: str) -> None:
        """The worker is gone: requeue its jobs (FAILED past max_attempts) and drop it."""
        w = self._workers.pop(worker_id, None)
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
        self._after_requeue(endpoint_id, requeued, failed)
        if w is not None:
            self.signals.fire("stop:" + worker_id)
        self._kick.set()

    def worker_ids(self) -> list[str]:
        """Workers the service believes are alive (for the launcher's exit sweep)."""
        return list(self._workers)

    # ---- internals -------------------------------------------------------------------------

    def _heard(self, w: _Worker) -> float:
        """When the worker was last heard from (its launch, or this process's start, at the earliest)."""
        return max(w.last_contact, w.created_at, self._started_at)

    def _ep(self, endpoint_id: str) -> _Endpoint:
        ep = self._endpoints.get(endpoint_id)
        if ep is None:
            raise ServerlessError(404, f"endpoint '{endpoint_id}' does not exist", "not_found")
        return ep

    async def _touch(self, endpoint_id: str, worker_id: str) -> _Worker:
        """Note contact from a worker. One this server does not count (reported exited and
        forgotten, or never launched here) is not adopted: it gets a stand-in that takes no jobs
        (its takes answer empty after the long poll), while a late result of its is still judged
        by the queue. Adopting it would hand work to a process no host reserved room for."""
        now = time.time()
        w = self._workers.get(worker_id)
        if w is None or w.endpoint_id != endpoint_id:
            if w is not None:
                raise ServerlessError(403, f"worker '{worker_id}' belongs to another endpoint", "forbidden")
            if worker_id not in self._refused:
                if len(self._refused) > 10_000:
                    self._refused.clear()
                self._refused.add(worker_id)
                log.warning(
                    "serverless: worker %s of %s is not counted here (exited or unknown): it gets no jobs",
                    worker_id,
                    endpoint_id,
                )
            return _Worker(worker_id, endpoint_id, STOPPING, now, now, now, stop_requested_at=now)
        elif w.state == INITIALIZING:
            w.state, w.last_busy = READY, now
            ep = self._endpoints.get(endpoint_id)
            if ep is not None:
                ep.launch_failures, ep.next_launch_at = 0, 0.0
            await self.store.set_worker_state(worker_id, READY, only_from=INITIALIZING)
        w.last_contact = now
        return w

    def _finished(self, done: list[Finished]) -> None:
        for d in done:
            self.signals.fire("job:" + d.id)
        if any(d.hooked for d in done):
            self._hook_kick.set()

    def _after_requeue(self, endpoint_id: str, requeued: list[str], failed: list[Finished]) -> None:
        if requeued:
            self.signals.fire("take:" + endpoint_id)
            self._kick.set()
        if failed:
            self._finished(failed)

    def _send_stop(self, worker_id: str, job_ids: list[str]) -> None:
        w = self._workers.get(worker_id)
        if w is not None and job_ids:
            w.stops.update(job_ids)
            self.signals.fire("stop:" + worker_id)

    async def _launch(self, ep: _Endpoint) -> None:
        worker_id = f"{ep.endpoint_id}-{uuid.uuid4().hex[:8]}"
        now = time.time()
        await self.store.add_worker(worker_id, ep.endpoint_id, INITIALIZING, now)
        self._workers[worker_id] = _Worker(worker_id, ep.endpoint_id, INITIALIZING, now, now, now)
        log.info("serverless: starting worker %s", worker_id)
        env = self.worker_env(ep.endpoint_id, worker_id)
        try:
            await self.launcher.start_worker(ep.endpoint_id, worker_id, env)
        except Exception as e:  # a failed launch must not stall the loop; the next tick retries
            log.exception("serverless: starting worker %s failed", worker_id)
            await self.on_worker_exited(ep.endpoint_id, worker_id, f"launch failed: {e}")

    async def _stop_worker(self, w: _Worker, reason: str, state: str = STOPPING) -> None:
        if w.state in (STOPPING, UNHEALTHY) and w.stop_requested_at:
            return
        w.state, w.stop_requested_at = state, time.time()
        log.info("serverless: stopping worker %s (%s): %s", w.worker_id, state, reason)
        await self.store.set_worker_state(w.worker_id, state, reason)
        self.signals.fire("take:" + w.endpoint_id)
        self._spawn(self._call_launcher_stop(w.endpoint_id, w.worker_id))

    async def _lose_worker(self, w: _Worker, state: str, reason: str) -> None:
        requeued, failed = await self.store.requeue(w.worker_id, self.options.max_attempts, reason)
        log.info(
            "serverless: lost worker %s: %s; %d job(s) requeued, %d failed",
            w.worker_id,
            reason,
            len(requeued),
            len(failed),
        )
        self._after_requeue(w.endpoint_id, requeued, failed)
        await self._stop_worker(w, reason, state)

    async def _call_launcher_stop(self, endpoint_id: str, worker_id: str) -> None:
        try:
            await self.launcher.stop_worker(endpoint_id, worker_id)
        except Exception:
            log.exception("serverless: stopping worker %s failed", worker_id)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _control_loop(self) -> None:
        last_expiry = 0.0
        while not self._closing:
            try:
                self._kick.clear()
                await self._timeouts()
                for ep in list(self._endpoints.values()):
                    await self._check_workers(ep)
                    await self._scale(ep)
                if time.time() - last_expiry > 2 * self.options.tick:
                    last_expiry = time.time()
                    await self._expire()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("serverless: control loop step failed")
            try:
                await asyncio.wait_for(self._kick.wait(), self.options.tick)
            except TimeoutError:
                pass

    async def _timeouts(self) -> None:
        done = await self.store.time_out()
        if not done:
            return
        self._finished(done)
        for d in done:
            if d.worker_id:
                self._send_stop(d.worker_id, [d.id])
                w = self._workers.get(d.worker_id)
                if w is not None:  # a handler past its timeout may be stuck (sync): replace the worker
                    await self._stop_worker(w, f"job {d.id} exceeded its execution timeout")

    async def _expire(self) -> None:
        for row in await self.store.expire(self.options.retention):
            self.signals.fire("job:" + row.id)
            if row.status == IN_PROGRESS and row.worker_id:
                self._send_stop(row.worker_id, [row.id])

    async def _check_workers(self, ep: _Endpoint) -> None:
        now = time.time()
        o = self.options
        for w in [w for w in self._workers.values() if w.endpoint_id == ep.endpoint_id]:
            contact = self._heard(w)
            if w.state == EXITED:
                if now - contact >= o.lost_grace:
                    await self._forget_worker(
                        ep.endpoint_id, w.worker_id, f"exited and silent for {now - contact:.0f} s"
                    )
                elif not await self.store.jobs_of_worker(w.worker_id):
                    await self._forget_worker(ep.endpoint_id, w.worker_id, "exited, and its jobs are done")
            elif w.state == INITIALIZING and now - contact > o.init_timeout:
                await self._lose_worker(w, UNHEALTHY, f"worker did not call in within {o.init_timeout:.0f} s")
            elif w.state == READY and now - contact > o.heartbeat_deadline:
                await self._lose_worker(w, UNHEALTHY, f"no heartbeat for {now - contact:.0f} s")
            elif (
                w.state in (STOPPING, UNHEALTHY) and now - max(w.stop_requested_at, contact) > o.heartbeat_deadline + 30
            ):
                await self.on_worker_exited(ep.endpoint_id, w.worker_id, "stopped and silent")

    async def _scale(self, ep: _Endpoint) -> None:
        now = time.time()
        q = await self.store.queue_counts(ep.endpoint_id)
        busy = q.busy_workers
        workers = [w for w in self._workers.values() if w.endpoint_id == ep.endpoint_id]
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
            await self._launch(ep)
        excess = len(live) - max(ep.settings.workers_min, want if ep.settings.scaler_type == "request_count" else 0)
        if excess <= 0 or q.queued_any:
            return
        for w in sorted((w for w in live if w.state == READY), key=lambda w: w.last_busy):
            if excess <= 0:
                break
            if w.worker_id not in busy and now - w.last_busy > ep.settings.idle_timeout:
                await self._stop_worker(w, f"idle for {ep.settings.idle_timeout:g} s")
                excess -= 1

    async def _webhook_loop(self) -> None:
        o = self.options
        while not self._closing:
            try:
                self._hook_kick.clear()
                for row in await self.store.due_webhooks(self._hooks_inflight):
                    self._hooks_inflight.add(row.id)
                    self._spawn(self._deliver(row))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("serverless: webhook loop step failed")
            try:
                await asyncio.wait_for(self._hook_kick.wait(), min(o.tick, o.webhook_retry_delay))
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
            await self.store.webhook_result(
                row.id, row.attempts + 1, ok, error, self.options.webhook_attempts, self.options.webhook_retry_delay
            )
        finally:
            self._hooks_inflight.discard(row.id)


#: the longest `policy.executionTimeout` and `policy.ttl` a job may ask for: 7 days, in ms
MAX_POLICY_MS = 7 * 24 * 3600 * 1000


def _positive_int(policy: dict, key: str, default: int) -> int:
    value = policy.get(key)
    if value is None:
        return default
    # a range check, not math.isfinite: that raises OverflowError for huge ints; NaN fails it too
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_POLICY_MS:
        raise ServerlessError(
            400,
            f"'policy.{key}' must be a positive number of milliseconds, at most {MAX_POLICY_MS} (7 days)",
            "invalid_request",
        )
    return int(value)


def _parse_object(raw: bytes) -> dict[str, Any]:
    """Workers send raw JSON under a form content-type: parse the body bytes ourselves."""
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise ServerlessError(400, "the body is not valid JSON", "invalid_request") from None
    if not isinstance(data, dict):
        raise ServerlessError(400, "the body must be a JSON object", "invalid_request")
    return data


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
