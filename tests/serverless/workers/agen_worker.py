"""Async generator handler without return_aggregate_stream (final output is [])."""

import asyncio

import runpod


async def handler(job):
    inp = job["input"]
    for i in range(inp.get("n", 3)):
        await asyncio.sleep(inp.get("delay", 0.05))
        yield f"token-{i}"


runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda c: 2})
