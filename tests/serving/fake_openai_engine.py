"""A stand-in for vLLM's OpenAI server (`... --host H --port P`): fixed tokens, no model.

Generates "Hello", " world", "!" (then EOS), honouring `max_tokens` and `stop`; `GET /last`
returns the last completions request; `POST /die` exits with status 3.
"""

import argparse
import json
import os

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

TOKENS = ["Hello", " world", "!"]
app = FastAPI()
last: dict = {}


def generate(req: dict) -> tuple[list[str], str, object]:
    stops = req.get("stop") or []
    out: list[str] = []
    for tok in TOKENS:
        if req.get("max_tokens") is not None and len(out) >= req["max_tokens"]:
            return out, "length", None
        if tok.strip() in stops:
            return out, "stop", tok.strip()
        out.append(tok)
    return out, "stop", None


@app.get("/health")
async def health():
    return {}


@app.get("/v1/models")
async def models():
    return {"object": "list", "data": [{"id": "fake/model", "object": "model", "max_model_len": 2048}]}


@app.get("/last")
async def get_last():
    return last


@app.post("/die")
async def die():
    os._exit(3)


@app.post("/v1/completions")
async def completions(request: Request):
    req = await request.json()
    last.clear()
    last.update(req)
    if req["prompt"] == "bad":
        return JSONResponse({"object": "error", "message": "bad prompt", "type": "BadRequestError", "code": 400}, 400)
    toks, reason, stop_reason = generate(req)
    usage = {"prompt_tokens": len(req["prompt"].split()), "completion_tokens": len(toks)}
    if not req.get("stream"):
        choice = {"index": 0, "text": "".join(toks), "finish_reason": reason, "stop_reason": stop_reason}
        return {"id": "cmpl-1", "object": "text_completion", "choices": [choice], "usage": usage}

    def chunk(choices, usage=None):
        return (
            "data: "
            + json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": choices, "usage": usage})
            + "\n\n"
        )

    def events():
        for t in toks:
            yield chunk([{"index": 0, "text": t, "finish_reason": None, "stop_reason": None}])
        yield chunk([{"index": 0, "text": "", "finish_reason": reason, "stop_reason": stop_reason}])
        yield chunk([], usage)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    a = ap.parse_args()
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
