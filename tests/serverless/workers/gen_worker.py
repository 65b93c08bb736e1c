"""Sync generator handler with return_aggregate_stream; also answers OpenAI-style jobs the way
RunPod's vLLM worker does ({"openai_route", "openai_input"} in, SSE strings or one body out)."""

import json
import time

import runpod


def openai(route, body):
    text = " ".join(m["content"] for m in body.get("messages", []))
    if body.get("stream"):
        for word in text.split():
            chunk = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}],
            }
            yield "data: " + json.dumps(chunk) + "\n\n"
        yield "data: [DONE]\n\n"
        return
    yield {
        "id": "c1",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "route": route,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text.upper()}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def handler(job):
    inp = job["input"]
    if "openai_route" in inp:
        yield from openai(inp["openai_route"], inp["openai_input"])
        return
    for i in range(inp.get("n", 3)):
        time.sleep(inp.get("delay", 0.05))
        yield {"chunk": i}


runpod.serverless.start({"handler": handler, "return_aggregate_stream": True})
