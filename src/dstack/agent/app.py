"""The agent's HTTP API (docs/contracts.md, "Agent HTTP API") as a FastAPI app."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from dstack.agent.host_info import host_info
from dstack.agent.jobs import JobError, JobManager
from dstack.agent.metrics import MAX_SAMPLES_PER_ANSWER, MetricsSampler
from dstack.agent.models import AgentJobSubmission, MetricsBatchRequest, StopRequest
from dstack.agent.volumes_api import volume_routes
from dstack.agent.watch import WatchRequest
from dstack.agent.watch import watch as watch_jobs
from dstack.core.tokens import bearer_token
from dstack.version import __version__

logger = logging.getLogger(__name__)

MAX_LINGER_SECONDS = 1.0
MAX_WAIT_SECONDS = 60.0
MAX_LIMIT = 10000
MAX_WAIT_RUNNING_SECONDS = 5.0


def create_app(home: Path, token: str) -> FastAPI:
    home = Path(home)
    manager = JobManager(home)
    sampler = MetricsSampler(manager)  # each running job's CPU, memory, GPU (agent.metrics)
    started_at = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(manager.net.probe)  # once; cached for /api/host and submissions
        await asyncio.to_thread(manager.isolation.probe)
        manager.load()
        # Unpack pip for the default Python now, so the first job does not pay for it; drop shared
        # venvs unused for a week (under their build lock, so a job starting meanwhile is safe).
        warm = asyncio.create_task(asyncio.to_thread(_warm_pip, manager))
        sampling = asyncio.create_task(sampler.run())
        try:
            yield
        finally:
            warm.cancel()
            sampling.cancel()
            manager.shutdown()

    app = FastAPI(title="dstack-agent", lifespan=lifespan)
    app.state.manager = manager

    def auth(request: Request) -> None:
        given = bearer_token(request.headers.get("authorization"))
        if given is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(403, "invalid token")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default body echoes the input: a submission's env and registry_auth.
        problems = [{"loc": e.get("loc"), "msg": e.get("msg")} for e in exc.errors()]
        return JSONResponse({"detail": problems}, status_code=422)

    @app.exception_handler(JobError)
    async def _job_error(request: Request, exc: JobError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    app.include_router(volume_routes(home, auth))  # a fleet host's volumes, made and removed here

    @app.get("/api/healthcheck")
    async def healthcheck() -> dict[str, Any]:
        return {"service": "dstack-agent", "version": __version__, "pid": os.getpid(), "started_at": started_at}

    @app.get("/api/host", dependencies=[Depends(auth)])
    async def host() -> dict[str, Any]:
        info = await asyncio.to_thread(host_info, home, manager.venvs)
        info["network_isolation"] = manager.net.available
        info["job_isolation"] = manager.isolation.available
        return info

    @app.get("/api/jobs", dependencies=[Depends(auth)])
    async def list_jobs() -> list[dict[str, Any]]:
        return [
            {"job_id": j.spec.job_id, "state": j.state, "network": j.network, "address": j.address}
            for j in manager.jobs.values()
        ]

    @app.post("/api/jobs", dependencies=[Depends(auth)])
    async def submit(
        spec: AgentJobSubmission, start: bool = False, wait_running: float = Query(0.0, ge=0)
    ) -> dict[str, Any]:
        """`start=true`: start it at once too (a job without code: one request instead of two);
        `wait_running`: answer once it left `preparing` (or that many seconds passed), with its
        state as `/pull` reports it, so the server learns `running` without a watch round trip."""
        job = manager.submit(spec)
        if not start:
            return {"job_id": spec.job_id}
        job.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait_running, MAX_WAIT_RUNNING_SECONDS)
        while job.state == "preparing" and await manager.changes.wait(spec.job_id, deadline - loop.time()):
            pass
        return {"job_id": spec.job_id, **job.status()}

    @app.put("/api/jobs/{job_id}/code", dependencies=[Depends(auth)])
    async def upload_code(job_id: str, request: Request) -> dict[str, Any]:
        job = manager.get(job_id)
        fd, name = tempfile.mkstemp(prefix="code-", suffix=".tar.gz", dir=job.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    f.write(chunk)
            await manager.put_code(job_id, Path(name))
        finally:
            os.unlink(name)
        return {}

    @app.post("/api/jobs/{job_id}/start", dependencies=[Depends(auth)])
    async def start(job_id: str) -> dict[str, str]:
        job = manager.get(job_id)
        job.start()
        return {"state": job.state}

    @app.get("/api/jobs/{job_id}/pull", dependencies=[Depends(auth)])
    async def pull(
        job_id: str,
        cursor: int = 0,
        known_state: str | None = None,
        wait: float = Query(0.0, ge=0),
        limit: int = Query(1000, ge=1),
        linger: float = Query(0.0, ge=0),
    ) -> Response:
        job = manager.get(job_id)
        body = await job.pull(
            cursor, known_state, min(wait, MAX_WAIT_SECONDS), min(limit, MAX_LIMIT), min(linger, MAX_LINGER_SECONDS)
        )
        return Response(body, media_type="application/json")

    @app.post("/api/watch", dependencies=[Depends(auth)])
    async def watch(body: WatchRequest) -> Response:
        """News of many jobs in one long poll (agent.watch): the server's one watch per agent."""
        return Response(await watch_jobs(manager, body), media_type="application/json")

    @app.get("/api/jobs/{job_id}/metrics", dependencies=[Depends(auth)])
    async def metrics(
        job_id: str, after: float = 0.0, limit: int = Query(MAX_SAMPLES_PER_ANSWER, ge=1)
    ) -> dict[str, Any]:
        manager.get(job_id)  # 404 for an unknown job
        return {"samples": sampler.samples(job_id, after, min(limit, MAX_SAMPLES_PER_ANSWER))}

    @app.post("/api/metrics", dependencies=[Depends(auth)])
    async def metrics_batch(body: MetricsBatchRequest) -> dict[str, Any]:
        """Many jobs' samples in one answer (the server's collector asks once per agent, not per job);
        jobs the agent does not know are left out."""
        known = {job_id: after for job_id, after in body.after.items() if job_id in manager.jobs}
        limit = min(body.limit, MAX_SAMPLES_PER_ANSWER)
        return {"jobs": {job_id: sampler.samples(job_id, after, limit) for job_id, after in known.items()}}

    @app.post("/api/jobs/{job_id}/stop", dependencies=[Depends(auth)])
    async def stop(job_id: str, body: StopRequest | None = None) -> dict[str, str]:
        job = manager.get(job_id)
        await job.stop(abort=bool(body and body.abort))
        return {"state": job.state}

    @app.delete("/api/jobs/{job_id}", dependencies=[Depends(auth)])
    async def delete(job_id: str) -> dict[str, Any]:
        await manager.delete(job_id)
        return {}

    return app


def _warm_pip(manager: JobManager) -> None:
    try:
        manager.venvs.pip_bundle(manager.venvs.resolve(None))
    except Exception:
        pass
    try:
        manager.venvs.evict_unused()
    except Exception:
        logger.exception("evicting unused shared venvs failed")
