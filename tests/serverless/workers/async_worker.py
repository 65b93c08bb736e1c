"""Async handler with a concurrency_modifier from WORKER_CONCURRENCY."""

import asyncio
import os
import time
from pathlib import Path

import runpod

CONCURRENCY = int(os.environ.get("WORKER_CONCURRENCY", "4"))
LOG = os.environ.get("WORKER_LOG")
active = 0


async def handler(job):
    global active
    inp = job["input"]
    started = time.time()
    if LOG:
        with open(LOG, "a") as f:
            f.write(job["id"] + "\n")
    mode = inp.get("mode", "echo")
    if mode == "echo":
        return {"echo": inp.get("value"), "i": inp.get("i"), "started": started}
    if mode == "sleep":
        active += 1
        try:
            peak = active
            await asyncio.sleep(inp["seconds"])
            return {
                "slept": inp["seconds"],
                "active_at_start": peak,
                "started": started,
                "worker": os.environ["RUNPOD_POD_ID"],
            }
        finally:
            active -= 1
    if mode == "loops":  # which job loops this worker runs: dstack's event-driven ones or the SDK's
        from runpod.serverless.modules import rp_scale

        return {"event_loops": bool(getattr(rp_scale.JobScaler, "dstack_event_loops", False))}
    if mode == "flaky":
        marker = Path(inp["marker"])
        if not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError("first attempt fails")
        return "second attempt works"
    return None


runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda current: CONCURRENCY})
