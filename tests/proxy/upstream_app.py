"""Test upstreams run as real processes: echo, SSE, WebSocket, TGI and OpenAI speakers, authorizer.

Run: python tests/proxy/upstream_app.py PORT ID [DELAY_SECONDS]
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

REPLICA_ID = sys.argv[2] if len(sys.argv) > 2 else "x"
DELAY = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
TEXT = "Hello from the test model. The answer is 42. END tail"
VALID_TOKENS = {"good", "other"}


async def echo(request: Request) -> Response:
    if DELAY:
        await asyncio.sleep(DELAY)
    h = hashlib.sha256()
    size = 0
    first_chunk_at = None
    async for chunk in request.stream():
        if chunk and first_chunk_at is None:
            first_chunk_at = time.time()
        h.update(chunk)
        size += len(chunk)
    body = {
        "id": REPLICA_ID,
        "method": request.method,
        "path": request.url.path,
        "raw_path": request.scope.get("raw_path", b"").decode("latin-1"),
        "query": request.url.query,
        "headers": {k: v for k, v in request.headers.items()},
        "size": size,
        "sha256": h.hexdigest(),
        "first_chunk_at": first_chunk_at,
        "done_at": time.time(),
    }
    status = int(request.query_params.get("status", "200"))
    return JSONResponse(body, status_code=status, headers={"x-replica": REPLICA_ID, "set-cookie": "a=1"})


async def sleep(request: Request) -> Response:
    await asyncio.sleep(float(request.query_params.get("s", "1")))
    return PlainTextResponse("slept")


async def sse(request: Request) -> Response:
    n = int(request.query_params.get("n", "5"))
    delay = float(request.query_params.get("delay", "0.3"))

    async def gen():
        for i in range(n):
            yield f"data: {json.dumps({'i': i, 't': time.time()})}\n\n"
            await asyncio.sleep(delay)
        yield f"data: {json.dumps({'end': True, 't': time.time()})}\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept(subprotocol=(websocket.scope.get("subprotocols") or [None])[0])
    await websocket.send_text(f"hello from {REPLICA_ID}")
    try:
        while True:
            msg = await websocket.receive()
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is not None:
                await websocket.send_text("echo:" + msg["text"])
            elif msg.get("bytes") is not None:
                await websocket.send_bytes(msg["bytes"][::-1])
    except Exception:
        return


def _tokens(text: str) -> list[str]:
    out, cur = [], ""
    for ch in text:
        cur += ch
        if ch == " ":
            out.append(cur)
            cur = ""
    if cur:
        out.append(cur)
    return out


def _generation(inputs: str, params: dict) -> tuple[list[str], str, str]:
    """Deterministic: TEXT's tokens, cut at max_new_tokens or after a stop string."""
    if "FAIL" in inputs:
        raise ValueError("Input validation error: the test model refuses FAIL")
    toks = _tokens(TEXT) + ["</s>"]
    max_new = params.get("max_new_tokens") or 100
    stops = params.get("stop") or []
    out: list[str] = []
    reason = "length"
    for t in toks[:max_new]:
        out.append(t)
        text = "".join(out)
        if t == "</s>":
            reason = "eos_token"
            break
        if any(text.endswith(s) for s in stops) or any(s in text for s in stops):
            reason = "stop_sequence"
            break
    else:
        reason = "length" if len(toks) > max_new else "eos_token"
    return out, "".join(out), reason


async def generate(request: Request) -> Response:
    body = await request.json()
    try:
        toks, text, reason = _generation(body["inputs"], body.get("parameters") or {})
    except ValueError as e:
        return JSONResponse({"error": str(e), "error_type": "validation"}, status_code=422)
    details = {"finish_reason": reason, "generated_tokens": len(toks), "seed": None, "prefill": [], "tokens": []}
    return JSONResponse(
        {
            "generated_text": text,
            "details": details,
            "replica": REPLICA_ID,
            "inputs": body["inputs"],
            "parameters": body.get("parameters"),
        }
    )


async def generate_stream(request: Request) -> Response:
    body = await request.json()
    inputs = body["inputs"]
    try:
        toks, text, reason = _generation(inputs, body.get("parameters") or {})
    except ValueError as e:
        return JSONResponse({"error": str(e), "error_type": "validation"}, status_code=422)

    async def gen():
        for i, t in enumerate(toks):
            last = i == len(toks) - 1
            ev = {
                "index": i,
                "token": {"id": i, "text": t, "logprob": -0.1, "special": t == "</s>"},
                "generated_text": text if last else None,
                "details": {
                    "finish_reason": reason,
                    "generated_tokens": len(toks),
                    "seed": None,
                    "input_length": len(inputs.split()),
                }
                if last
                else None,
            }
            if "BREAK" in inputs and i == 2:
                yield f"data:{json.dumps({'error': 'the test model broke', 'error_type': 'generation'})}\n\n"
                return
            yield f"data:{json.dumps(ev)}\n\n"
            await asyncio.sleep(0.02)

    return StreamingResponse(gen(), media_type="text/event-stream", headers={"x-accel-buffering": "no"})


async def tokenize(request: Request) -> Response:
    body = await request.json()
    return JSONResponse([{"id": i, "text": w} for i, w in enumerate(body["inputs"].split())])


async def info(request: Request) -> Response:
    return JSONResponse({"model_id": "test-model", "max_best_of": 2, "max_stop_sequences": 4, "version": "test"})


async def health(request: Request) -> Response:
    return Response(status_code=200)


async def openai_chat(request: Request) -> Response:
    body = await request.json()
    chat = request.url.path.endswith("/chat/completions")
    if body.get("model") == "broken":
        return JSONResponse(
            {"error": {"message": "upstream exploded", "type": "server_error", "code": 500}}, status_code=500
        )
    created = 1700000000
    if not body.get("stream"):
        choice = (
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"openai-echo {REPLICA_ID}"},
                "finish_reason": "stop",
            }
            if chat
            else {"index": 0, "text": f"openai-echo {REPLICA_ID}", "finish_reason": "stop", "logprobs": None}
        )
        return JSONResponse(
            {
                "id": "x1",
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": body["model"],
                "choices": [choice],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
            }
        )

    async def gen():
        for i, word in enumerate(["openai-", "echo ", REPLICA_ID]):
            delta = {"role": "assistant", "content": word} if i == 0 else {"content": word}
            choice = (
                {"index": 0, "delta": delta, "finish_reason": None}
                if chat
                else {"index": 0, "text": word, "finish_reason": None}
            )
            yield (
                "data: "
                + json.dumps(
                    {
                        "id": "x1",
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created,
                        "model": body["model"],
                        "choices": [choice],
                    }
                )
                + "\n\n"
            )
            await asyncio.sleep(0.02)
        fin = (
            {"index": 0, "delta": {}, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": "", "finish_reason": "stop"}
        )
        yield (
            "data: "
            + json.dumps(
                {
                    "id": "x1",
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created,
                    "model": body["model"],
                    "choices": [fin],
                }
            )
            + "\n\n"
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            yield (
                "data: "
                + json.dumps(
                    {
                        "id": "x1",
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": body["model"],
                        "choices": [],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
                    }
                )
                + "\n\n"
            )
        yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")


async def authorize(request: Request) -> Response:
    body = await request.json()
    if request.headers.get("authorization") != "Bearer gw-secret":
        return JSONResponse({"detail": "bad gateway token"}, status_code=401)
    ok = body.get("token") in VALID_TOKENS and body.get("project") in ("main", "p")
    return JSONResponse({"allowed": ok}, status_code=200 if ok else 403)


app = Starlette(
    routes=[
        Route("/sleep", sleep),
        Route("/sse", sse),
        WebSocketRoute("/ws", ws_echo),
        Route("/generate", generate, methods=["POST"]),
        Route("/generate_stream", generate_stream, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/info", info),
        Route("/health", health),
        Route("/v1/chat/completions", openai_chat, methods=["POST"]),
        Route("/v1/completions", openai_chat, methods=["POST"]),
        Route("/api/proxy/authorize", authorize, methods=["POST"]),
        Route("/{path:path}", echo, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
    ]
)

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="off")
