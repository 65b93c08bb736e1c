"""HTTP surface of serverless endpoints, included by the server at the app root.

`/v2/{endpoint}/...`: the RunPod-style client API (Bearer user token of a project member), the
OpenAI passthrough, and the worker protocol (raw per-endpoint worker token, no `Bearer`).
CORS is handled here, scoped to these routes: browsers call endpoints straight from web pages.
The service is found at `request.app.state.serverless`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute

from dstack.server.security import bearer_token, error_detail
from dstack.serverless.models import TERMINAL
from dstack.serverless.service import ServerlessError, ServerlessService

CORS_HEADERS = {
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Max-Age": "600",
}


def _cors(request: Request, response: Response) -> Response:
    response.headers["Access-Control-Allow-Origin"] = request.headers.get("origin") or "*"
    response.headers["Vary"] = "Origin"
    response.headers["Access-Control-Expose-Headers"] = "Content-Type"
    return response


class _ServerlessRoute(APIRoute):
    """Turns ServerlessError / validation errors into `{"detail": [...]}` bodies and adds CORS headers."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                response = await handler(request)
            except ServerlessError as e:
                response = JSONResponse(error_detail(e.msg, e.code), status_code=e.status)
            except RequestValidationError as e:
                first = e.errors()[0] if e.errors() else {}
                fields = [str(x) for x in first.get("loc", ())[1:]]
                response = JSONResponse(error_detail(first.get("msg", "invalid request"), "invalid_request", fields), status_code=400)
            return _cors(request, response)

        return wrapped


router = APIRouter(route_class=_ServerlessRoute, tags=["serverless"])


def _svc(request: Request) -> ServerlessService:
    return request.app.state.serverless


async def _client(request: Request, endpoint_id: str) -> ServerlessService:
    svc = _svc(request)
    await svc.authorize(endpoint_id, bearer_token(request))
    return svc


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ServerlessError(400, "the body is not valid JSON", "invalid_request") from None


# ---- CORS preflight --------------------------------------------------------------------------

@router.options("/v2/{endpoint_id}/{rest:path}")
async def preflight(request: Request, endpoint_id: str, rest: str) -> Response:
    headers = dict(CORS_HEADERS)
    headers["Access-Control-Allow-Headers"] = request.headers.get("access-control-request-headers") or "Authorization, Content-Type"
    return Response(status_code=204, headers=headers)


# ---- client API ------------------------------------------------------------------------------

@router.post("/v2/{endpoint_id}/run")
async def run(request: Request, endpoint_id: str) -> Response:
    svc = await _client(request, endpoint_id)
    job_id = await svc.submit(endpoint_id, await _json_body(request))
    return JSONResponse({"id": job_id, "status": "IN_QUEUE"})


@router.post("/v2/{endpoint_id}/runsync")
async def runsync(request: Request, endpoint_id: str, wait: int | None = None) -> Response:
    svc = await _client(request, endpoint_id)
    return JSONResponse(await svc.run_sync(endpoint_id, await _json_body(request), wait))


@router.api_route("/v2/{endpoint_id}/status/{job_id}", methods=["GET", "POST"])
async def status(request: Request, endpoint_id: str, job_id: str) -> Response:
    svc = await _client(request, endpoint_id)
    return JSONResponse(await svc.status(endpoint_id, job_id))


@router.api_route("/v2/{endpoint_id}/stream/{job_id}", methods=["GET", "POST"])
async def stream(request: Request, endpoint_id: str, job_id: str) -> Response:
    svc = await _client(request, endpoint_id)
    return JSONResponse(await svc.stream(endpoint_id, job_id))


@router.post("/v2/{endpoint_id}/cancel/{job_id}")
async def cancel(request: Request, endpoint_id: str, job_id: str) -> Response:
    svc = await _client(request, endpoint_id)
    return JSONResponse(await svc.cancel(endpoint_id, job_id))


@router.post("/v2/{endpoint_id}/retry/{job_id}")
async def retry(request: Request, endpoint_id: str, job_id: str) -> Response:
    svc = await _client(request, endpoint_id)
    return JSONResponse(await svc.retry(endpoint_id, job_id))


@router.post("/v2/{endpoint_id}/purge-queue")
async def purge_queue(request: Request, endpoint_id: str) -> Response:
    svc = await _client(request, endpoint_id)
    return JSONResponse(await svc.purge(endpoint_id))


@router.get("/v2/{endpoint_id}/health")
async def health(request: Request, endpoint_id: str) -> Response:
    svc = await _client(request, endpoint_id)
    return JSONResponse(await svc.health(endpoint_id))


@router.api_route("/v2/{endpoint_id}/openai/{path:path}", methods=["GET", "POST"])
async def openai(request: Request, endpoint_id: str, path: str) -> Response:
    """OpenAI-compatible calls become jobs `{"openai_route", "openai_input"}`, as RunPod's vLLM
    worker expects; what the handler yields comes back as SSE (stream=true) or one JSON body."""
    svc = await _client(request, endpoint_id)
    body = await _json_body(request) if request.method == "POST" else None
    job_input = {"openai_route": "/" + path.lstrip("/"), "openai_input": body if body is not None else {}}
    job_id = await svc.submit(endpoint_id, {"input": job_input})
    if isinstance(body, dict) and body.get("stream"):
        return StreamingResponse(_sse(svc, endpoint_id, job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    result = await _wait_final(svc, endpoint_id, job_id, svc.options.runsync_max_ms / 1000)
    if result["status"] != "COMPLETED":
        code = 504 if result["status"] not in TERMINAL else 500
        return JSONResponse({"error": {"message": result.get("error") or f"job {result['status']}", "type": result["status"]}}, status_code=code)
    output = result.get("output")
    if isinstance(output, list) and len(output) == 1:
        output = output[0]
    return JSONResponse(output)


async def _wait_final(svc: ServerlessService, endpoint_id: str, job_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = await svc.status(endpoint_id, job_id)
        if body["status"] in TERMINAL or time.monotonic() >= deadline:
            return body
        await svc.wait_job(job_id, min(1.0, deadline - time.monotonic()))


async def _sse(svc: ServerlessService, endpoint_id: str, job_id: str) -> AsyncIterator[bytes]:
    done_sent = False
    finished = False
    try:
        while True:
            got = await svc.stream(endpoint_id, job_id)
            for item in got["stream"]:
                chunk = item["output"]
                text = chunk if isinstance(chunk, str) else json.dumps(chunk)
                done_sent = done_sent or "[DONE]" in text
                if not text.startswith("data:"):
                    text = f"data: {text}"
                yield (text.rstrip("\n") + "\n\n").encode()
            if got["status"] in TERMINAL and not got["stream"]:
                finished = True
                if got.get("error"):
                    yield f"data: {json.dumps({'error': {'message': got['error'], 'type': got['status']}})}\n\n".encode()
                break
            if not got["stream"]:
                await svc.wait_job(job_id, 1.0)
        if not done_sent:
            yield b"data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away: don't leave the job running
            try:
                await svc.cancel(endpoint_id, job_id)
            except Exception:
                pass


# ---- worker protocol -------------------------------------------------------------------------

def _worker(request: Request, endpoint_id: str) -> ServerlessService:
    svc = _svc(request)
    svc.check_worker(endpoint_id, request.headers.get("authorization"))
    return svc


def _job_json(row: Any) -> str:
    parts = ['{"id":', json.dumps(row.id), ',"input":', row.input]
    if row.webhook:
        parts += [',"webhook":', json.dumps(row.webhook)]
    parts.append("}")
    return "".join(parts)


@router.get("/v2/{endpoint_id}/job-take/{worker_id}")
async def job_take(request: Request, endpoint_id: str, worker_id: str) -> Response:
    svc = _worker(request, endpoint_id)
    rows = await svc.take(endpoint_id, worker_id, 1, request.is_disconnected)
    if not rows:
        return Response(status_code=204)
    return Response(_job_json(rows[0]), media_type="application/json")


@router.get("/v2/{endpoint_id}/job-take-batch/{worker_id}")
async def job_take_batch(request: Request, endpoint_id: str, worker_id: str, batch_size: int = 1) -> Response:
    svc = _worker(request, endpoint_id)
    rows = await svc.take(endpoint_id, worker_id, max(1, min(batch_size, 1000)), request.is_disconnected)
    if not rows:
        return Response(status_code=204)
    return Response("[" + ",".join(_job_json(r) for r in rows) + "]", media_type="application/json")


@router.post("/v2/{endpoint_id}/job-done/{worker_id}/{job_id}")
async def job_done(request: Request, endpoint_id: str, worker_id: str, job_id: str) -> Response:
    svc = _worker(request, endpoint_id)
    await svc.job_done(endpoint_id, worker_id, job_id, await request.body())
    return JSONResponse({"ok": True})


@router.post("/v2/{endpoint_id}/job-stream/{worker_id}/{job_id}")
async def job_stream(request: Request, endpoint_id: str, worker_id: str, job_id: str) -> Response:
    svc = _worker(request, endpoint_id)
    await svc.job_stream(endpoint_id, worker_id, job_id, await request.body())
    return JSONResponse({"ok": True})


@router.get("/v2/{endpoint_id}/job-stop/{worker_id}")
async def job_stop(request: Request, endpoint_id: str, worker_id: str) -> Response:
    svc = _worker(request, endpoint_id)
    ids = await svc.job_stop(endpoint_id, worker_id)
    if not ids:
        return Response(status_code=204)
    return JSONResponse({"jobsToStop": ids})


@router.get("/v2/{endpoint_id}/ping/{worker_id}")
async def ping(request: Request, endpoint_id: str, worker_id: str, job_id: str | None = None,
               runpod_version: str | None = None, status: str | None = None, check: str | None = None,
               reason: str | None = None) -> Response:
    svc = _worker(request, endpoint_id)
    ids = [j for j in (job_id or "").split(",") if j]
    unhealthy = f"{check or '?'}: {reason or ''}" if status == "unhealthy" else None
    await svc.ping(endpoint_id, worker_id, ids, runpod_version, unhealthy)
    return JSONResponse({"ok": True})
