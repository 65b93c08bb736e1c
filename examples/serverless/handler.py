"""A plain RunPod handler: runs unchanged on RunPod and as a dstack serverless worker.

    dstack apply -f serverless.dstack.yml

dstack hands the worker the same RUNPOD_* environment RunPod does, so
`runpod.serverless.start` polls this endpoint's queue and posts results back.
"""

import time

import runpod


def handler(job):
    job_input = job["input"]
    name = job_input.get("name", "World")
    seconds = float(job_input.get("seconds", 0))
    if seconds:
        time.sleep(seconds)  # stands in for real work
    return {"greeting": f"Hello, {name}!"}


runpod.serverless.start({"handler": handler})
