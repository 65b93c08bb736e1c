"""The server's side of the agent HTTP API (docs/contracts.md)."""

import time
from typing import Any

import httpx

from dstack.agent.models import AgentJobSubmission
from dstack.core.http_client import internal_client
from dstack.server.backends.base import AgentEndpoint


class AgentError(Exception):
    pass


class AgentClient:
    """One pooled HTTP client per agent; long polls share it."""

    def __init__(self, endpoint: AgentEndpoint, transport: httpx.AsyncBaseTransport | None = None) -> None:
        """`transport`: how requests reach the agent (default: HTTP to `endpoint.url`); tests give
        an `httpx.MockTransport` to drive the pipeline without an agent process."""
        self.endpoint = endpoint
        self._http = internal_client(base_url=endpoint.url, token=endpoint.token, timeout=30.0, transport=transport)
        self._http.event_hooks["response"].append(self._answered)
        #: monotonic time of the agent's last 2xx answer to anything (None: none yet); a busy agent
        #: answers polls and metrics all the time, which the supervisor counts as a sign of life
        self.last_answer: float | None = None
        #: monotonic time of the last healthcheck that the agent passed
        self.last_healthy: float | None = None
        #: the last failed healthcheck ran out of time or lost its connection (a slow agent, server or SSH
        #: forward), rather than being refused
        self.last_check_timed_out = False
        #: monotonic time of the first of the healthchecks in a row that ran out of time (None: the last did not)
        self.timing_out_since: float | None = None

    async def _answered(self, response: httpx.Response) -> None:
        if 200 <= response.status_code < 300:
            self.last_answer = time.monotonic()

    async def close(self) -> None:
        await self._http.aclose()

    async def healthy(self, timeout: float = 2.0) -> bool:
        """The agent answers its healthcheck, and is the process this client was made for."""
        self.last_check_timed_out = False
        try:
            r = await self._http.get("/api/healthcheck", timeout=timeout)
            ok = r.status_code == 200 and self.endpoint.pid in (None, r.json().get("pid"))
            self.timing_out_since = None
        except (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
            # Out of time, or the connection dropped mid-way (through an SSH forward of a busy
            # connection): maybe only slow. A refused connection (ConnectError) is not this.
            self.last_check_timed_out = True
            self.timing_out_since = self.timing_out_since or time.monotonic()
            return False
        except (httpx.HTTPError, ValueError, RuntimeError):  # RuntimeError: the client was closed
            return False
        if ok:
            self.last_healthy = time.monotonic()
        return ok

    async def submit(
        self, submission: AgentJobSubmission, start: bool = False, wait_running: float = 0.0
    ) -> dict[str, Any]:
        """Hand the job to the agent; with `start`, ask it to start the job in the same request
        (and to answer once the job left `preparing`, up to `wait_running` seconds). The answer
        has `state` only when the agent started it (an older agent ignores `start`, and a job it
        already had is not started by this: the caller starts it)."""
        params: dict[str, str | float] | None = {"start": "true", "wait_running": wait_running} if start else None
        timeout = 30.0 + wait_running
        r = await self._http.post("/api/jobs", json=submission.model_dump(mode="json"), params=params, timeout=timeout)
        if r.status_code == 409:
            return {}
        if r.status_code != 200:
            raise AgentError(f"agent refused job: {r.status_code} {r.text}")
        try:
            return _json_object(r)
        except ValueError:
            return {}

    async def upload_code(self, job_id: str, blob: bytes) -> None:
        r = await self._http.put(
            f"/api/jobs/{job_id}/code", content=blob, headers={"Content-Type": "application/octet-stream"}
        )
        if r.status_code != 200:
            raise AgentError(f"agent refused code: {r.status_code} {r.text}")

    async def start(self, job_id: str) -> dict[str, Any]:
        r = await self._http.post(f"/api/jobs/{job_id}/start")
        if r.status_code != 200:
            raise AgentError(f"agent could not start job: {r.status_code} {r.text}")
        return _json_object(r)

    async def pull(
        self, job_id: str, cursor: int, known_state: str | None, wait: float, limit: int = 2000, linger: float = 0.0
    ) -> dict[str, Any]:
        params: dict[str, str | int | float] = {"cursor": cursor, "wait": wait, "limit": limit, "linger": linger}
        if known_state:
            params["known_state"] = known_state
        r = await self._http.get(f"/api/jobs/{job_id}/pull", params=params, timeout=wait + linger + 15)
        if r.status_code == 404:
            raise AgentError("the agent does not know this job")
        r.raise_for_status()
        return _json_object(r)

    async def watch(
        self,
        jobs: dict[str, tuple[int, str | None]],
        since: int | None,
        wait: float,
        limit: int = 2000,
        linger: float = 0.0,
    ) -> dict[str, Any] | None:
        """News of many jobs in one long poll (`POST /api/watch`; job id -> (log cursor, known
        state)): `{"seq", "jobs": {id: report}, "unknown": [ids]}`. None from an agent older than
        that route (the caller pulls per job)."""
        body = {
            "jobs": {k: {"cursor": c, "state": s} for k, (c, s) in jobs.items()},
            "since": since,
            "wait": wait,
            "limit": limit,
            "linger": linger,
        }
        r = await self._http.post("/api/watch", json=body, timeout=wait + linger + 15)
        if r.status_code in (404, 405):
            return None
        r.raise_for_status()
        answer = _json_object(r)
        if not isinstance(answer.get("jobs"), dict) or not isinstance(answer.get("seq"), int):
            raise AgentError("agent answered /api/watch without seq and jobs")
        return answer

    async def metrics(self, job_id: str, after: float) -> list[dict[str, Any]]:
        """The job's usage samples newer than `after` (agent.metrics), oldest first."""
        r = await self._http.get(f"/api/jobs/{job_id}/metrics", params={"after": after}, timeout=10)
        if r.status_code == 404:
            raise AgentError("the agent does not know this job")
        r.raise_for_status()
        samples: list[dict[str, Any]] = r.json()["samples"]
        return samples

    async def create_volume(self, volume_id: str, size_bytes: int | None) -> bool:
        """Make volume `volume_id` on the agent's host; whether its size is enforced there."""
        r = await self._http.post(f"/api/volumes/{volume_id}", json={"size_bytes": size_bytes}, timeout=150)
        if r.status_code != 200:
            raise AgentError(f"the agent could not create the volume: {r.status_code} {_detail(r)}")
        return bool(_json_object(r).get("size_enforced"))

    async def delete_volume(self, volume_id: str) -> None:
        r = await self._http.delete(f"/api/volumes/{volume_id}", timeout=150)
        if r.status_code != 200:
            raise AgentError(f"the agent could not delete the volume: {r.status_code} {_detail(r)}")

    async def is_dir(self, path: str) -> bool:
        """Whether `path` is a directory on the agent's host (a volume registered by `volume_id`)."""
        r = await self._http.post("/api/volumes/check", json={"path": path})
        if r.status_code != 200:
            raise AgentError(f"the agent could not check {path}: {r.status_code} {_detail(r)}")
        return bool(_json_object(r).get("is_dir"))

    async def metrics_many(self, after: dict[str, float]) -> dict[str, list[dict[str, Any]]] | None:
        """Several jobs' usage samples in one request (`POST /api/metrics`): job id -> samples newer
        than `after[job id]`; jobs the agent does not know are left out. None from an agent older
        than that route (the caller asks per job)."""
        r = await self._http.post("/api/metrics", json={"after": after}, timeout=10)
        if r.status_code in (404, 405):
            return None
        r.raise_for_status()
        jobs = _json_object(r).get("jobs")
        if not isinstance(jobs, dict):
            raise AgentError("agent answered /api/metrics without a jobs object")
        return {k: v for k, v in jobs.items() if isinstance(v, list)}

    async def stop(self, job_id: str, abort: bool) -> None:
        r = await self._http.post(f"/api/jobs/{job_id}/stop", json={"abort": abort})
        if r.status_code not in (200, 404, 409):
            raise AgentError(f"agent could not stop job: {r.status_code} {r.text}")

    async def delete(self, job_id: str) -> None:
        await self._http.delete(f"/api/jobs/{job_id}")


def _json_object(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    if not isinstance(body, dict):
        raise AgentError(f"agent answered {r.request.url.path} with {type(body).__name__}, not an object")
    return body


def _detail(r: httpx.Response) -> str:
    """The agent's `detail`, bounded (an error answer's text)."""
    try:
        body = r.json()
        detail = body.get("detail") if isinstance(body, dict) else None
    except ValueError:
        detail = None
    return str(detail if detail is not None else r.text)[:500]
