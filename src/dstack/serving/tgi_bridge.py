"""``python -m dstack.serving.tgi_bridge --port P --model-id M -- vllm serve M ...``: TGI's API in
front of an OpenAI-compatible engine (vLLM).

Services with an engine speak TGI (`/generate`, `/generate_stream`, `/info`, `/health`: the proxy
converts OpenAI chat requests into `/generate`), but vLLM serves only the OpenAI API. The bridge
starts the engine command on a free loopback port (appending ``--host 127.0.0.1 --port N``),
waits until its ``/health`` answers, and only then listens on ``--port`` (so a TCP readiness
probe means "model loaded"). TGI requests become ``/v1/completions`` calls; every other path
(`/v1/...`, `/metrics`, ...) is passed through unchanged. The bridge exits with the engine's
status when the engine exits, and stops the engine when it is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dstack.core.http_client import internal_client
from dstack.version import __version__

SSE_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}
MAX_STOP_SEQUENCES = 4


# -- TGI request -> OpenAI completions request --------------------------------------------------------


def completion_request(model_id: str, body: dict[str, Any], stream: bool) -> dict[str, Any]:
    """A TGI `{inputs, parameters}` body as a vLLM `/v1/completions` body (vLLM's extra sampling
    fields included). TGI samples when asked or when any sampling knob is set; else it is greedy."""
    p = body.get("parameters") or {}
    req: dict[str, Any] = {
        "model": model_id,
        "prompt": body.get("inputs", ""),
        "stream": stream,
        # None: up to the context length, as TGI does (OpenAI's default is 16)
        "max_tokens": p.get("max_new_tokens"),
    }
    temperature = p.get("temperature")
    sampling = (
        bool(p.get("do_sample"))
        or (temperature not in (None, 1.0))
        or any(p.get(k) for k in ("top_k", "top_p", "typical_p"))
    )
    if sampling:
        req["temperature"] = 1.0 if temperature is None else temperature
        for key in ("top_p", "top_k"):
            if p.get(key) is not None:
                req[key] = p[key]
    else:
        req["temperature"] = 0.0
    for key in ("repetition_penalty", "frequency_penalty", "seed"):
        if p.get(key) is not None:
            req[key] = p[key]
    if p.get("stop"):
        req["stop"] = list(p["stop"])[:MAX_STOP_SEQUENCES]
    if stream:
        req["stream_options"] = {"include_usage": True}
    return req


def tgi_finish_reason(choice: dict[str, Any]) -> str:
    """OpenAI/vLLM finish reason -> TGI's: vLLM's `stop_reason` is the stop string (None for EOS)."""
    if choice.get("finish_reason") == "length":
        return "length"
    return "stop_sequence" if isinstance(choice.get("stop_reason"), str) else "eos_token"


def _details(choice: dict[str, Any], usage: dict[str, Any], seed: int | None) -> dict[str, Any]:
    return {
        "finish_reason": tgi_finish_reason(choice),
        "generated_tokens": int(usage.get("completion_tokens") or 0),
        "seed": seed,
        "input_length": int(usage.get("prompt_tokens") or 0),
    }


def generate_response(body: dict[str, Any], completion: dict[str, Any]) -> dict[str, Any]:
    """A `/v1/completions` answer as TGI's `/generate` answer."""
    p = body.get("parameters") or {}
    choice = (completion.get("choices") or [{}])[0]
    text = choice.get("text") or ""
    if p.get("return_full_text"):
        text = str(body.get("inputs", "")) + text
    out: dict[str, Any] = {"generated_text": text}
    if p.get("details"):
        out["details"] = {**_details(choice, completion.get("usage") or {}, p.get("seed")), "prefill": [], "tokens": []}
    return out


def tgi_error(status: int, content: bytes) -> JSONResponse:
    """The engine's error as TGI's `{error, error_type}` (400 -> 422 validation, as TGI answers)."""
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    message = content.decode(errors="replace")[:500] or f"HTTP {status}"
    if isinstance(data, dict):
        err = data.get("error", data)
        message = str(err.get("message", err) if isinstance(err, dict) else err)
    if status == 400:
        return JSONResponse({"error": message, "error_type": "validation"}, status_code=422)
    return JSONResponse({"error": message, "error_type": "generation"}, status_code=status if status >= 400 else 500)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data:" + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def _token(text: str) -> dict[str, Any]:
    return {"id": 0, "text": text, "logprob": None, "special": False}


async def stream_events(lines: AsyncIterator[str], body: dict[str, Any]) -> AsyncIterator[bytes]:
    """OpenAI completion chunks -> TGI stream events. One chunk is held back, so the last event
    carries the final token together with `generated_text` and `details`, like TGI's."""
    p = body.get("parameters") or {}
    held: str | None = None
    text, index, choice, usage = "", 0, {}, {}
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            err = chunk["error"]
            yield _sse(
                {"error": str(err.get("message", err) if isinstance(err, dict) else err), "error_type": "generation"}
            )
            return
        usage = chunk.get("usage") or usage
        for c in chunk.get("choices") or []:
            choice = {**choice, **{k: v for k, v in c.items() if v is not None}}
            piece = c.get("text") or ""
            if not piece:
                continue
            if held is not None:
                index += 1
                yield _sse({"index": index, "token": _token(held), "generated_text": None, "details": None})
            held = piece
            text += piece
    full = (str(body.get("inputs", "")) + text) if p.get("return_full_text") else text
    details = _details(choice, usage, p.get("seed"))
    yield _sse({"index": index + 1, "token": _token(held or ""), "generated_text": full, "details": details})


# -- the app -------------------------------------------------------------------------------------------


def create_app(
    upstream: str, model_id: str, max_concurrent_requests: int = 128, client: httpx.AsyncClient | None = None
) -> FastAPI:
    app = FastAPI(title="dstack TGI bridge", docs_url=None, redoc_url=None, openapi_url=None)
    http = client or internal_client(base_url=upstream, timeout=None, connect_timeout=10)

    @app.get("/health")
    async def health() -> Response:
        try:
            r = await http.get("/health", timeout=10)
        except httpx.HTTPError:
            return Response(status_code=503)
        return Response(status_code=200 if r.status_code == 200 else 503)

    @app.get("/info")
    async def info() -> dict[str, Any]:
        max_total = None
        try:
            models = (await http.get("/v1/models", timeout=10)).json().get("data") or []
            max_total = next((m.get("max_model_len") for m in models if m.get("max_model_len")), None)
        except (httpx.HTTPError, ValueError, AttributeError):
            pass
        return {
            "model_id": model_id,
            "model_sha": None,
            "model_dtype": None,
            "model_device_type": "cuda",
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": max_concurrent_requests,
            "max_best_of": 1,
            "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_tokens": max_total - 1 if max_total else None,
            "max_total_tokens": max_total,
            "router": "dstack-tgi-bridge",
            "backend": "vllm",
            "version": __version__,
            "sha": None,
            "docker_label": None,
        }

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await request.json()
        r = await http.post("/v1/completions", json=completion_request(model_id, body, stream=False))
        if r.status_code != 200:
            return tgi_error(r.status_code, r.content)
        return JSONResponse(generate_response(body, r.json()))

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> Response:
        return await _stream(await request.json())

    async def _stream(body: dict[str, Any]) -> Response:
        req = http.build_request("POST", "/v1/completions", json=completion_request(model_id, body, stream=True))
        r = await http.send(req, stream=True)
        if r.status_code != 200:
            content = await r.aread()
            await r.aclose()
            return tgi_error(r.status_code, content)

        async def events() -> AsyncIterator[bytes]:
            try:
                async for event in stream_events(r.aiter_lines(), body):
                    yield event
            finally:
                await r.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/")
    async def compat(request: Request) -> Response:
        """TGI's `POST /` (what the `text-generation` client calls): `stream` picks the route."""
        body = await request.json()
        if body.get("stream"):
            return await _stream(body)
        r = await http.post("/v1/completions", json=completion_request(model_id, body, stream=False))
        if r.status_code != 200:
            return tgi_error(r.status_code, r.content)
        return JSONResponse([generate_response(body, r.json())])

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    async def passthrough(path: str, request: Request) -> Response:
        """The engine's own API (OpenAI routes, metrics, ...) as it is, streamed both ways."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        req = http.build_request(
            request.method, "/" + path, params=request.query_params, headers=headers, content=await request.body()
        )
        r = await http.send(req, stream=True)
        out_headers = {k: v for k, v in r.headers.items() if k.lower() not in HOP_HEADERS}
        return StreamingResponse(r.aiter_raw(), status_code=r.status_code, headers=out_headers, background=_Close(r))

    return app


class _Close:
    """Starlette background task closing the upstream response after the body is sent."""

    def __init__(self, r: httpx.Response) -> None:
        self.r = r

    async def __call__(self) -> None:
        await self.r.aclose()


# -- supervising the engine process ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float | None) -> bool:
    """Poll ``url/health`` until 200; False when the engine exits or ``timeout`` passes first."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while proc.poll() is None and (deadline is None or time.monotonic() < deadline):
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m dstack.serving.tgi_bridge [options] -- ENGINE COMMAND ...")
    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="python -m dstack.serving.tgi_bridge", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--model-id", required=True)
    ap.add_argument("--max-concurrent-requests", type=int, default=128)
    ap.add_argument(
        "--startup-timeout", type=float, default=None, help="seconds to wait for the engine (default: no limit)"
    )
    args = ap.parse_args(argv[:split])
    engine = argv[split + 1 :]
    if not engine:
        ap.error("an engine command is required after --")
    return args, engine


def main(argv: list[str] | None = None) -> int:
    args, engine = parse_args(argv)
    port = free_port()
    proc = subprocess.Popen([*engine, "--host", "127.0.0.1", "--port", str(port)])
    upstream = f"http://127.0.0.1:{port}"

    def stop(signum: int, _frame: Any) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if not wait_healthy(upstream, proc, args.startup_timeout):
        if proc.poll() is None:
            print(f"tgi_bridge: the engine did not become healthy in {args.startup_timeout:g} s", file=sys.stderr)
            proc.kill()
        return proc.wait() or 1
    print(f"tgi_bridge: engine ready; TGI API on {args.host}:{args.port}", file=sys.stderr, flush=True)
    return asyncio.run(_serve(args, upstream, proc))


async def _serve(args: argparse.Namespace, upstream: str, proc: subprocess.Popen) -> int:
    """Serve until the engine exits (its status) or the bridge is stopped (then stop the engine)."""
    import uvicorn

    app = create_app(upstream, args.model_id, args.max_concurrent_requests)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    engine_exit = asyncio.create_task(asyncio.to_thread(proc.wait))
    await asyncio.wait({serving, engine_exit}, return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():  # the engine is gone: so is the API
        server.should_exit = True
        await serving
        rc = proc.returncode or 1
        return rc if rc > 0 else 128 - rc
    failed = serving.exception() is not None  # e.g. the port is taken; else a stop signal
    if proc.poll() is None:
        proc.terminate()
    try:
        await asyncio.wait_for(asyncio.shield(engine_exit), 30)
    except TimeoutError:
        proc.kill()
        await engine_exit
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
