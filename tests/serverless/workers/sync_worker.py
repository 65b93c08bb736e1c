"""Sync handler: echo, raise, sleep, progress updates, error dicts, refresh_worker."""

import os
import time

import runpod


def handler(job):
    inp = job["input"]
    mode = inp.get("mode", "echo")
    if mode == "echo":
        return {"echo": inp.get("value"), "started": time.time(), "worker": os.environ["RUNPOD_POD_ID"]}
    if mode == "raise":
        raise ValueError(f"boom {inp.get('value')}")
    if mode == "sleep":
        time.sleep(inp["seconds"])
        return {"slept": inp["seconds"]}
    if mode == "progress":
        runpod.serverless.progress_update(job, {"step": "half"})
        time.sleep(inp.get("seconds", 2))
        return "done"
    if mode == "error_dict":
        return {"error": "handled failure", "partial": 1}
    if mode == "refresh":
        return {"refresh_worker": True, "worker": os.environ["RUNPOD_POD_ID"]}
    return inp.get("value")


runpod.serverless.start({"handler": handler})
