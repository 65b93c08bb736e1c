"""A TCP tunnel to a running job's port over a WebSocket: how `ssh RUN` reaches a dev environment.

`WS /api/project/{p}/runs/{run}/tunnel?port=N` (or `?ssh=1` for the dev environment's SSH server)
relays bytes both ways between the WebSocket (binary messages) and a TCP connection to the job's
port, opened from the server: directly to a job on the server's own host, through the fleet
host's SSH connection on a fleet host (`services.fleets.replica_url`). The caller authenticates
with its user token (`Authorization: Bearer`), like every API call; the CLI bridges it to stdin and
stdout for OpenSSH's `ProxyCommand` (`dstack tunnel`). Nothing listens on the job's host network.

Each tunnel to a dev environment's SSH server counts as a session: `Sessions` remembers how many
are open and when the last one closed, and `InactivityWatch` stops a dev environment whose
`inactivity_duration` has passed with none open. The job row keeps when its last session opened and
closed (`ssh_opened_at`, `ssh_closed_at`), so a restarted server goes on counting from there; a
session still open when the server stopped was ended by that stop, so the count restarts then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime
from urllib.parse import urlsplit

from fastapi import APIRouter, FastAPI, Query, WebSocket, WebSocketDisconnect
from sqlalchemy import select, update
from sqlalchemy.orm import selectinload

from dstack.agent.devenv import ssh_port
from dstack.core.models.runs import JobProvisioningData, JobSpec, JobStatus, JobTerminationReason, RunStatus, RunType
from dstack.core.tokens import bearer_token
from dstack.server.background.pipeline.common import aware
from dstack.server.db import Database, get_database
from dstack.server.models import JobModel, RunModel, utcnow
from dstack.server.security import authenticate, project_for_member
from dstack.server.services import fleets
from dstack.server.services.runs import find_run, mark_job_terminating

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/api/project/{project_name}/runs", tags=["runs"])
CHUNK = 65536
CHECK_SECONDS = 1.0
#: WebSocket close codes: 4401 no valid token, 4403 no access, 4404 nothing to reach, 4400 a port the
#: job does not declare, 4502 connect failed
CLOSE_AUTH, CLOSE_FORBIDDEN, CLOSE_NOT_FOUND, CLOSE_PORT, CLOSE_UNREACHABLE = 4401, 4403, 4404, 4400, 4502


class Sessions:
    """Open SSH tunnels per run id, and when each run's last one closed (monotonic seconds)."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}
        self.last_closed: dict[str, float] = {}

    def opened(self, run_id: str) -> None:
        self.open[run_id] = self.open.get(run_id, 0) + 1

    def closed(self, run_id: str) -> None:
        left = self.open.get(run_id, 1) - 1
        if left > 0:
            self.open[run_id] = left
        else:
            self.open.pop(run_id, None)
        self.last_closed[run_id] = time.monotonic()

    def idle_since(self, run_id: str, default: float) -> float | None:
        """None while a session is open; else since when the run has had none."""
        if self.open.get(run_id):
            return None
        return self.last_closed.get(run_id, default)


SESSIONS = Sessions()


async def _target(
    db: Database, project_name: str, run_name: str, token: str | None, port: int | None
) -> tuple[int, str, str, int, str]:
    """(close code or 0, run id, host, port, job id) of what to connect to."""
    async with db.session() as session:
        user = await authenticate(session, token)
        if user is None:
            return CLOSE_AUTH, "", "", 0, ""
        project = await project_for_member(session, user, project_name)
        if project is None:
            return CLOSE_FORBIDDEN, "", "", 0, ""
        run = await find_run(session, project, run_name)
        if run is None or run.status != RunStatus.RUNNING:
            return CLOSE_NOT_FOUND, "", "", 0, ""
        jobs = await session.execute(
            select(JobModel).where(JobModel.run_id == run.id, JobModel.status == JobStatus.RUNNING)
        )
        job = next(iter(sorted(jobs.scalars(), key=lambda j: (j.replica_num, j.job_num))), None)
        if job is None or not job.job_provisioning_data:
            return CLOSE_NOT_FOUND, "", "", 0, ""
        if port is None:
            if run.run_type != RunType.DEV_ENVIRONMENT:
                return CLOSE_NOT_FOUND, "", "", 0, ""
            port = ssh_port(job.id)
        elif port not in JobSpec.model_validate_json(job.job_spec).ports:
            # only what the job declares: a host-network job's address is the host's own 127.0.0.1
            return CLOSE_PORT, "", "", 0, ""
        jpd = JobProvisioningData.model_validate_json(job.job_provisioning_data)
        url = urlsplit(await fleets.replica_url(jpd, port))
        return 0, run.id, url.hostname or "127.0.0.1", url.port or port, job.id


@router.websocket("/{run_name}/tunnel")
async def tunnel(
    websocket: WebSocket,
    project_name: str,
    run_name: str,
    port: int | None = Query(None, ge=1, le=65535),
    ssh: bool = False,
) -> None:
    token = bearer_token(websocket.headers.get("authorization"), bare=True)
    if port is None and not ssh:
        await _refuse(websocket, CLOSE_NOT_FOUND, "give ?port=N or ?ssh=1")
        return
    code, run_id, host, target_port, job_id = await _target(get_database(), project_name, run_name[:200], token, port)
    if code:
        reasons = {
            CLOSE_AUTH: "invalid or missing token",
            CLOSE_FORBIDDEN: f"project '{project_name}' does not exist or you are not a member of it",
            CLOSE_NOT_FOUND: f"run '{run_name}' has no running job to reach" + ("" if port else " over SSH"),
            CLOSE_PORT: f"port {port} is not one of the run's ports",
        }
        await _refuse(websocket, code, reasons[code])
        return
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, target_port), 15)
    except (OSError, TimeoutError) as e:
        await _refuse(websocket, CLOSE_UNREACHABLE, f"cannot reach the job's port {target_port}: {e}")
        return
    await websocket.accept()
    if ssh:
        SESSIONS.opened(run_id)
        await record_ssh_session(job_id, "ssh_opened_at")
    try:
        await _relay(websocket, reader, writer)
    finally:
        writer.close()
        if ssh:
            SESSIONS.closed(run_id)
            await record_ssh_session(job_id, "ssh_closed_at")


async def record_ssh_session(job_id: str, column: str) -> None:
    """Store when a session opened or closed on the job row. A plain UPDATE of that column: it
    does not bump the row's version, so it never conflicts with the pipeline's writes."""
    try:
        async with get_database().session() as session:
            await session.execute(
                update(JobModel)
                .where(JobModel.id == job_id)
                .values({column: utcnow()})
                .execution_options(synchronize_session=False)
            )
            await session.commit()
    except Exception:  # the in-memory count still holds; only a restart would lose this one
        logger.exception("cannot record an SSH session of job %s", job_id)


async def _refuse(websocket: WebSocket, code: int, reason: str) -> None:
    """Accept, then close with a code and reason: a close before the handshake would reach the
    client as a bare HTTP 403, without saying why."""
    await websocket.accept()
    await websocket.close(code, reason[:120])


async def _relay(websocket: WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async def upstream() -> None:
        try:
            while True:
                data = await websocket.receive_bytes()
                writer.write(data)
                await writer.drain()
        except (WebSocketDisconnect, ConnectionError, KeyError, RuntimeError):
            pass

    async def downstream() -> None:
        try:
            while data := await reader.read(CHUNK):
                await websocket.send_bytes(data)
        except (ConnectionError, RuntimeError, WebSocketDisconnect):
            pass
        try:
            await websocket.close()
        except RuntimeError:
            pass

    tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class InactivityWatch:
    """Stops a running dev environment after `inactivity_duration` seconds with no SSH session,
    counted from its last session's end, else from its job's start (`idle_since`)."""

    def __init__(self, db: Database, app: FastAPI, sessions: Sessions = SESSIONS) -> None:
        self.db = db
        self.app = app
        self.sessions = sessions
        self.first_seen: dict[str, float] = {}  # wall time; for a job with no start time stored
        self.started = time.time()  # a session open when the previous server stopped ended then
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                logger.exception("inactivity check failed")
            await asyncio.sleep(CHECK_SECONDS)

    def idle_since(self, run: RunModel, now: float) -> float | None:
        """Wall time since when `run` has had no SSH session; None while one is open."""
        if self.sessions.open.get(run.id):
            return None
        jobs = [j for j in run.jobs if j.status == JobStatus.RUNNING] or list(run.jobs)
        job = max(jobs, key=lambda j: j.submission_num) if jobs else None
        since = self.first_seen.setdefault(run.id, now)
        if job is not None:
            since = _stamp(job.started_at, since)
            opened, closed = _stamp(job.ssh_opened_at, 0.0), _stamp(job.ssh_closed_at, 0.0)
            if opened > closed:  # open when the last server stopped (this one did not open it)
                since = max(since, self.started)
            since = max(since, closed)
        memory = self.sessions.last_closed.get(run.id)  # monotonic: this server's own record
        if memory is not None:
            since = max(since, now - (time.monotonic() - memory))
        return since

    async def check(self) -> None:
        now = time.time()
        stopped = False
        async with self.db.session() as session:
            result = await session.execute(
                select(RunModel)
                .where(RunModel.run_type == RunType.DEV_ENVIRONMENT, RunModel.status == RunStatus.RUNNING)
                .options(selectinload(RunModel.jobs))
            )
            runs = list(result.scalars())
            running = {run.id for run in runs}
            for table in (self.first_seen, self.sessions.last_closed):
                for run_id in [r for r in table if r not in running]:
                    del table[run_id]
            for run in runs:
                limit = json.loads(run.run_spec).get("configuration", {}).get("inactivity_duration")
                if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
                    continue
                since = self.idle_since(run, now)
                if since is None or now - since < limit:
                    continue
                message = f"inactivity_duration: no SSH session for {limit} s"
                run.status = RunStatus.TERMINATING
                for job in run.jobs:
                    if not job.status.is_finished():
                        mark_job_terminating(job, JobTerminationReason.TERMINATED_BY_SERVER, message=message)
                logger.info("stopping dev environment %s: %s", run.run_name, message)
                stopped = True
            if stopped:
                await session.commit()
        if stopped:
            self.app.state.pipeline.wake()


def _stamp(value: datetime | None, default: float) -> float:
    dt = aware(value)
    return dt.timestamp() if dt is not None else default


def install(app: FastAPI) -> None:
    """Route the tunnel and run the inactivity watch with the server."""
    app.include_router(router)

    async def _start(app: FastAPI) -> None:
        watch = InactivityWatch(app.state.db, app)
        app.state.inactivity_watch = watch
        await watch.start()

    async def _stop(app: FastAPI) -> None:
        watch = getattr(app.state, "inactivity_watch", None)
        if watch is not None:
            await watch.stop()

    app.state.startup_hooks.append(_start)
    app.state.shutdown_hooks.insert(0, _stop)
