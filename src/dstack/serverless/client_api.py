"""The RunPod client API of an endpoint: submit (`run`, `runsync`), read (`status`, `stream`,
`health`), and change (`cancel`, `retry`, `purge-queue`) jobs, for a member of its project."""

from __future__ import annotations

import json
import time
from typing import Any

from dstack.proxy.auth import Access
from dstack.serverless.errors import ErrorKind, ServerlessError
from dstack.serverless.models import FAILED, IN_PROGRESS, IN_QUEUE, TERMINAL
from dstack.serverless.pool import INITIALIZING, READY, Pool
from dstack.serverless.queue import status_object

MISSING_TOKEN = "missing Authorization: Bearer <token> header"


class ClientApi:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def authorize(self, endpoint_id: str, token: str | None) -> None:
        """A user token of a member of the endpoint's project, through the auth cache the proxy
        shares (cached briefly: /run is hot). Project names are unique and never reused, so the
        name the endpoint was registered under stands for its project."""
        if not token:
            raise ServerlessError(ErrorKind.NOT_AUTHENTICATED, MISSING_TOKEN, "not_authenticated")
        ep = self.pool.endpoints.get(endpoint_id)
        # "" names no project: for an unknown endpoint only the token's validity is asked
        access = await self.pool.ports.access.check(ep.project_name if ep else "", token)
        if access is Access.UNKNOWN_TOKEN:
            raise ServerlessError(ErrorKind.NOT_AUTHENTICATED, "invalid or revoked token", "not_authenticated")
        if ep is None or access is not Access.ALLOWED:
            raise ServerlessError(
                ErrorKind.NOT_FOUND,
                f"endpoint '{endpoint_id}' does not exist or you are not a member of its project",
                "not_found",
            )

    async def submit(self, endpoint_id: str, body: Any) -> str:
        ep = self.pool.ep(endpoint_id)
        if not isinstance(body, dict) or "input" not in body:
            raise ServerlessError(
                ErrorKind.INVALID, "the body must be a JSON object with an 'input' field", "invalid_request"
            )
        webhook = body.get("webhook")
        if webhook is not None and (not isinstance(webhook, str) or not webhook.startswith(("http://", "https://"))):
            raise ServerlessError(ErrorKind.INVALID, "'webhook' must be an http(s) URL", "invalid_request")
        policy = body.get("policy") or {}
        if not isinstance(policy, dict):
            raise ServerlessError(ErrorKind.INVALID, "'policy' must be an object", "invalid_request")
        timeout_ms = _positive_int(policy, "executionTimeout", int(ep.settings.execution_timeout * 1000))
        ttl_ms = _positive_int(policy, "ttl", self.pool.options.default_ttl_ms)
        low = policy.get("lowPriority", False)
        if not isinstance(low, bool):
            raise ServerlessError(ErrorKind.INVALID, "'policy.lowPriority' must be a boolean", "invalid_request")
        input_json = json.dumps(body["input"], separators=(",", ":"))
        job_id = await self.pool.store.submit(endpoint_id, input_json, webhook, timeout_ms, ttl_ms, low)
        self.pool.notifier.notify("take:" + endpoint_id)
        if not low and not any(
            w.endpoint_id == endpoint_id and w.state in (INITIALIZING, READY) for w in self.pool.workers.values()
        ):
            self.pool.kick.set()  # cold start: don't wait for the next tick
        return job_id

    async def run_sync(self, endpoint_id: str, body: Any, wait_ms: int | None) -> dict[str, Any]:
        wait = (
            min(
                wait_ms if wait_ms is not None else self.pool.options.runsync_default_ms,
                self.pool.options.runsync_max_ms,
            )
            / 1000
        )
        deadline = time.monotonic() + max(0.0, wait)
        job_id = await self.submit(endpoint_id, body)
        while True:
            remaining = deadline - time.monotonic()
            fired = await self.pool.notifier.wait("job:" + job_id, min(remaining, 1.0))
            row = await self.pool.store.get(endpoint_id, job_id)
            if row is None or row.status in TERMINAL or (not fired and deadline - time.monotonic() <= 0):
                break
        if row is None:
            return {"id": job_id, "status": "IN_QUEUE"}
        return status_object(row)

    async def status(self, endpoint_id: str, job_id: str) -> dict[str, Any]:
        self.pool.ep(endpoint_id)
        row = await self.pool.store.get(endpoint_id, job_id)
        if row is None:
            raise ServerlessError(ErrorKind.NOT_FOUND, f"job '{job_id}' not found (it may have expired)", "not_found")
        return status_object(row)

    async def stream(self, endpoint_id: str, job_id: str) -> dict[str, Any]:
        self.pool.ep(endpoint_id)
        got = await self.pool.store.take_stream(endpoint_id, job_id)
        if got is None:
            raise ServerlessError(ErrorKind.NOT_FOUND, f"job '{job_id}' not found (it may have expired)", "not_found")
        row, chunks = got
        body = status_object(row)
        body.pop("output", None)
        body["stream"] = [{"output": json.loads(c)} for c in chunks]
        return body

    async def wait_job(self, job_id: str, timeout: float) -> None:
        """Until the job changes (a chunk, progress, a final state) or `timeout`."""
        await self.pool.notifier.wait("job:" + job_id, timeout)

    async def cancel(self, endpoint_id: str, job_id: str) -> dict[str, Any]:
        self.pool.ep(endpoint_id)
        row, done = await self.pool.store.cancel(endpoint_id, job_id)
        if row is None:
            raise ServerlessError(ErrorKind.NOT_FOUND, f"job '{job_id}' not found (it may have expired)", "not_found")
        if done is None:
            return {"id": job_id, "status": row.status}
        self.pool.finished([done])
        if row.status == IN_PROGRESS and row.worker_id:
            self.pool.send_stop(row.worker_id, [job_id])
        return {"id": job_id, "status": done.status}

    async def retry(self, endpoint_id: str, job_id: str) -> dict[str, Any]:
        self.pool.ep(endpoint_id)
        old = await self.pool.store.retry(endpoint_id, job_id)
        if old is None:
            raise ServerlessError(ErrorKind.NOT_FOUND, f"job '{job_id}' not found (it may have expired)", "not_found")
        if old not in (FAILED, "TIMED_OUT"):
            raise ServerlessError(
                ErrorKind.INVALID,
                f"only FAILED or TIMED_OUT jobs can be retried; job '{job_id}' is {old}",
                "invalid_state",
            )
        self.pool.notifier.notify("take:" + endpoint_id)
        self.pool.kick.set()
        return {"id": job_id, "status": IN_QUEUE}

    async def purge(self, endpoint_id: str) -> dict[str, Any]:
        self.pool.ep(endpoint_id)
        return {"removed": await self.pool.store.purge(endpoint_id), "status": "completed"}

    async def health(self, endpoint_id: str) -> dict[str, Any]:
        st = await self.pool.endpoint_status(endpoint_id)
        jobs = st["jobs"]
        return {
            "jobs": {k: jobs[k] for k in ("completed", "failed", "inProgress", "inQueue", "retried")},
            "workers": st["workers"],
        }


#: the longest `policy.executionTimeout` and `policy.ttl` a job may ask for: 7 days, in ms
MAX_POLICY_MS = 7 * 24 * 3600 * 1000


def _positive_int(policy: dict[str, Any], key: str, default: int) -> int:
    value = policy.get(key)
    if value is None:
        return default
    # a range check, not math.isfinite: that raises OverflowError for huge ints; NaN fails it too
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_POLICY_MS:
        raise ServerlessError(
            ErrorKind.INVALID,
            f"'policy.{key}' must be a positive number of milliseconds, at most {MAX_POLICY_MS} (7 days)",
            "invalid_request",
        )
    return int(value)
