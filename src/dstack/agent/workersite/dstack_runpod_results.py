"""Results that outlive a server restart, for serverless workers that dstack starts.

runpod 1.12 posts a job's result (and each stream chunk) with three quick tries, well under a
second in all, then drops it and forgets the job; the next heartbeat no longer names the job,
so the server requeues it and the job runs a second time on a worker that never died. Here the
post is tried again, with back-off, while the server cannot be reached or answers 5xx/429, for
up to DSTACK_RESULT_RETRY_SECONDS (default 600). The job stays in the SDK's in-progress set all
that time, so heartbeats keep naming it and the server keeps it with this worker; the server
accepts the late result. A 4xx answer is final, as before.

Applied by `dstack_runpod_loop.patch` to `runpod.serverless.modules.rp_http` (stdlib and the
SDK's own aiohttp only).
"""

import asyncio
import os
import time

FIRST_DELAY = 0.5
MAX_DELAY = 5.0


def _retry_seconds():
    try:
        return max(0.0, float(os.environ.get("DSTACK_RESULT_RETRY_SECONDS", "600")))
    except ValueError:
        return 600.0


def _worth_retrying(error, aiohttp):
    if isinstance(error, asyncio.TimeoutError):
        return True
    if isinstance(error, aiohttp.ClientResponseError):
        return error.status >= 500 or error.status == 429
    return isinstance(error, aiohttp.ClientError)


def patch(rp_http):
    """Wrap rp_http._transmit (looked up at call time by send_result and stream_result)."""
    import aiohttp

    original = getattr(rp_http, "_transmit", None)
    if original is None or getattr(original, "dstack_retries", False):
        return False
    log = rp_http.log

    async def _transmit(client_session, url, job_data):
        deadline = time.monotonic() + _retry_seconds()
        delay = FIRST_DELAY
        while True:
            try:
                return await original(client_session, url, job_data)
            except Exception as error:
                if not _worth_retrying(error, aiohttp) or time.monotonic() + delay > deadline:
                    raise
                log.warn(
                    f"dstack: posting a result failed ({type(error).__name__}: {error}); trying again in {delay:.1f} s"
                )
            await asyncio.sleep(delay)
            delay = min(MAX_DELAY, delay * 2)

    _transmit.dstack_retries = True
    rp_http._transmit = _transmit
    return True
