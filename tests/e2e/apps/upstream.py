"""Small upstream apps the service tests run as replicas (stdlib only: jobs have their own venv).

Usage: python upstream.py MODE PORT, MODE one of plain | sse | tgi | openai.
- plain: echoes method, path, query, body and which replica answered; /die/N exits replica N;
  /slow?s=X sleeps X seconds.
- sse: /stream?n=N&delay=D sends N events D seconds apart.
- tgi: /generate and /generate_stream answering deterministic text (the prompt's words reversed).
- openai: /v1/chat/completions and /v1/completions, streaming and not.
"""

import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

MODE = sys.argv[1]
PORT = int(sys.argv[2])
REPLICA = os.environ.get("DSTACK_REPLICA_NUM", "?")


def words(prompt: str) -> list[str]:
    return list(reversed(prompt.split()))[:8] or ["empty"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        n = int(self.headers.get("content-length") or 0)
        return self.rfile.read(n) if n else b""

    def _json(self, status: int, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse_start(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()

    def _event(self, payload: str) -> None:
        self.wfile.write(f"data: {payload}\n\n".encode())
        self.wfile.flush()

    def do_GET(self) -> None:
        self.handle_any("GET")

    def do_POST(self) -> None:
        self.handle_any("POST")

    def do_PUT(self) -> None:
        self.handle_any("PUT")

    def handle_any(self, method: str) -> None:
        url = urlparse(self.path)
        query = parse_qs(url.query)
        body = self._body()
        if MODE == "plain":
            if url.path.startswith("/die/"):
                if url.path == f"/die/{REPLICA}":
                    self._json(200, {"dying": REPLICA})
                    os._exit(3)
                return self._json(404, {"not": REPLICA})
            if url.path == "/slow":
                time.sleep(float(query.get("s", ["1"])[0]))
            return self._json(
                200,
                {
                    "replica": REPLICA,
                    "method": method,
                    "path": url.path,
                    "query": url.query,
                    "body": body.decode(errors="replace"),
                    "auth": self.headers.get("authorization"),
                    "x_custom": self.headers.get("x-custom"),
                },
            )
        if MODE == "sse":
            n = int(query.get("n", ["5"])[0])
            delay = float(query.get("delay", ["0.5"])[0])
            self._sse_start()
            for i in range(n):
                self._event(json.dumps({"i": i, "t": time.time()}))
                time.sleep(delay)
            self.close_connection = True
            return
        if method == "GET":
            return self._json(200, {"ok": True, "mode": MODE})  # readiness for the model apps
        req = json.loads(body or b"{}")
        if MODE == "tgi":
            return self.tgi(url.path, req)
        if MODE == "openai":
            return self.openai(url.path, req)
        self._json(404, {"error": "unknown mode"})

    def tgi(self, path: str, req: dict) -> None:
        params = req.get("parameters") or {}
        if req.get("inputs") == "FAIL":
            return self._json(424, {"error": "generation failed on purpose", "error_type": "generation"})
        out = words(req.get("inputs", ""))[: params.get("max_new_tokens", 8)]
        finish = "length" if len(out) == params.get("max_new_tokens") else "eos_token"
        details = {
            "finish_reason": finish,
            "generated_tokens": len(out),
            "seed": None,
            "input_length": len(req.get("inputs", "").split()),
        }
        if path == "/generate":
            return self._json(
                200, {"generated_text": " ".join(out), "details": details if params.get("details") else None}
            )
        if path == "/generate_stream":
            self._sse_start()
            for i, w in enumerate(out):
                last = i == len(out) - 1
                text = w if i == 0 else " " + w
                self._event(
                    json.dumps(
                        {
                            "index": i,
                            "token": {"id": i, "text": text, "logprob": 0.0, "special": False},
                            "generated_text": " ".join(out) if last else None,
                            "details": details if last else None,
                        }
                    )
                )
                time.sleep(0.05)
            self.close_connection = True
            return
        self._json(404, {"error": "no route"})

    def openai(self, path: str, req: dict) -> None:
        chat = path.endswith("/chat/completions")
        prompt = req["messages"][-1]["content"] if chat else req.get("prompt", "")
        out = words(prompt)
        created, cid = int(time.time()), "cmpl-test"
        if not req.get("stream"):
            choice = (
                {"index": 0, "message": {"role": "assistant", "content": " ".join(out)}, "finish_reason": "stop"}
                if chat
                else {"index": 0, "text": " ".join(out), "logprobs": None, "finish_reason": "stop"}
            )
            return self._json(
                200,
                {
                    "id": cid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": req["model"],
                    "choices": [choice],
                    "usage": {"prompt_tokens": 3, "completion_tokens": len(out), "total_tokens": 3 + len(out)},
                },
            )
        self._sse_start()
        for i, w in enumerate(out):
            text = w if i == 0 else " " + w
            delta = (
                {"index": 0, "delta": {"content": text}, "finish_reason": None}
                if chat
                else {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
            )
            self._event(
                json.dumps(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created,
                        "model": req["model"],
                        "choices": [delta],
                    }
                )
            )
        end = (
            {"index": 0, "delta": {}, "finish_reason": "stop"}
            if chat
            else {"index": 0, "text": "", "finish_reason": "stop"}
        )
        self._event(
            json.dumps(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": req["model"],
                    "choices": [end],
                }
            )
        )
        self._event("[DONE]")
        self.close_connection = True


if __name__ == "__main__":
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("0.0.0.0", PORT), Handler).serve_forever()
