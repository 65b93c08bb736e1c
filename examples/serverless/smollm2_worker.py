"""A RunPod-style LLM worker: SmolLM2 behind the endpoint's OpenAI route.

    dstack apply -f smollm2.dstack.yml

The worker starts dstack's built-in engine (`python -m dstack.serving`, llama.cpp) on a free local
port, waits until it has loaded the model, and only then starts polling for jobs. Jobs arrive in
the two shapes RunPod's vLLM worker accepts:

- `{"openai_route": "/v1/chat/completions", "openai_input": {...}}` — what the endpoint's
  `/openai/v1/...` route submits. The body is forwarded to the engine's OpenAI route; with
  `"stream": true` every Server-Sent Event is yielded as a `"data: ..."` string (the endpoint
  relays them to the client as SSE), otherwise the JSON answer is yielded once.
- `{"prompt": "...", "parameters": {...}, "stream": false}` — plain text generation through the
  engine's TGI `/generate` (or `/generate_stream`, yielding text pieces when `stream` is true).

`return_aggregate_stream` makes a job's final output the list of everything yielded, so `/run`,
`/runsync` and non-streaming OpenAI calls get the answer in `output`.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import aiohttp
import runpod

MODEL = os.environ.get("MODEL", "SmolLM2-135M-Instruct")
MAX_CONCURRENCY = int(os.environ.get("MAX_CONCURRENCY", "8"))  # the engine batches requests together


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_engine() -> str:
    """Start the engine with dstack's own Python (it has llama-cpp-python) and wait for /health."""
    port = _free_port()
    python = os.environ.get("DSTACK_ENGINE_PYTHON") or sys.executable
    proc = subprocess.Popen(
        [python, "-m", "dstack.serving", "--model", MODEL, "--host", "127.0.0.1", "--port", str(port)]
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + float(os.environ.get("ENGINE_START_TIMEOUT", "600"))
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the engine exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return url
        except OSError:
            pass
        time.sleep(0.2)
    proc.terminate()
    sys.exit("the engine did not become healthy in time")


ENGINE = start_engine()
_session: aiohttp.ClientSession | None = None


def session() -> aiohttp.ClientSession:
    global _session
    if _session is None or _session.closed:
        _session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=600))
    return _session


async def _error(resp: aiohttp.ClientResponse) -> RuntimeError:
    return RuntimeError(f"engine answered {resp.status}: {(await resp.text())[:1000]}")


async def openai(route: str, body: dict):
    url = ENGINE + "/" + route.lstrip("/")
    if not body and route.rstrip("/").endswith("/models"):
        async with session().get(url) as resp:
            if resp.status != 200:
                raise await _error(resp)
            yield await resp.json()
        return
    async with session().post(url, json=body) as resp:
        if resp.status != 200:
            raise await _error(resp)
        if not body.get("stream"):
            yield await resp.json()
            return
        async for raw in resp.content:  # one SSE line at a time
            line = raw.decode().strip()
            if line.startswith("data:"):
                yield line + "\n\n"


async def generate(job_input: dict):
    body = {"inputs": job_input["prompt"], "parameters": job_input.get("parameters") or {"max_new_tokens": 64}}
    if not job_input.get("stream"):
        async with session().post(ENGINE + "/generate", json=body) as resp:
            if resp.status != 200:
                raise await _error(resp)
            yield await resp.json()
        return
    async with session().post(ENGINE + "/generate_stream", json=body) as resp:
        if resp.status != 200:
            raise await _error(resp)
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                if not event["token"].get("special"):
                    yield event["token"]["text"]


async def handler(job):
    job_input = job["input"]
    if "openai_route" in job_input:
        async for item in openai(job_input["openai_route"], job_input.get("openai_input") or {}):
            yield item
    elif "prompt" in job_input:
        async for item in generate(job_input):
            yield item
    else:
        raise ValueError("expected {'openai_route', 'openai_input'} or {'prompt'} in the job input")


runpod.serverless.start(
    {
        "handler": handler,
        "concurrency_modifier": lambda current: MAX_CONCURRENCY,
        "return_aggregate_stream": True,
    }
)
