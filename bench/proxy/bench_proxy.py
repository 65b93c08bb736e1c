"""Added latency and throughput of dstack's proxy vs a direct call, nginx and LiteLLM.

    cd /work/main && PYTHONPATH=src .venv/bin/python bench/proxy/bench_proxy.py [--duration 5] [--litellm /tmp/litellm-venv]

Needs `wrk` (load generator) and `nginx` on PATH (Debian packages); LiteLLM is optional (a venv
with `litellm[proxy]`). Every peer fronts the same tiny upstream (raw asyncio + httptools) in
the same run, so the ratios are comparable even on a noisy shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
CHAT = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
RESP = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(CHAT), CHAT)
REQ_BODY = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "hi"}]})
STREAM_CHUNKS, STREAM_GAP = 30, 0.02


# ---------------------------------------------------------------- upstream (own process)
def run_upstream(port: int) -> None:
    import httptools
    import uvloop

    class Up(asyncio.Protocol):
        def connection_made(self, t):  # type: ignore[no-untyped-def]
            self.t = t
            self.p = httptools.HttpRequestParser(self)
            self.url = b""

        def data_received(self, d: bytes) -> None:
            self.p.feed_data(d)

        def on_url(self, u: bytes) -> None:
            self.url += u

        def on_message_complete(self) -> None:
            if self.url.startswith(b"/stream"):
                asyncio.ensure_future(self.stream())
            else:
                self.t.write(RESP)
            self.url = b""

        async def stream(self) -> None:
            self.t.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for _ in range(STREAM_CHUNKS):
                data = b"data: %.6f\n\n" % time.time()
                self.t.write(b"%x\r\n%s\r\n" % (len(data), data))
                await asyncio.sleep(STREAM_GAP)
            self.t.write(b"0\r\n\r\n")

    async def main() -> None:
        srv = await asyncio.get_running_loop().create_server(Up, "127.0.0.1", port, backlog=1024)
        await srv.serve_forever()

    uvloop.run(main())


# ---------------------------------------------------------------- dstack proxy (own process)
def run_dstack(port: int, upstream: str) -> None:
    import uvicorn

    from dstack.proxy import ModelInfo, Replica, ServiceInfo, ServiceRegistry, build_proxy_app

    registry = ServiceRegistry()

    async def authorize(project: str, token: str | None) -> bool:
        return token == "t"

    app = build_proxy_app(registry, authorize)
    registry.upsert_service(ServiceInfo("main", "bench", auth=True, model=ModelInfo("bench-model", "openai")))
    registry.set_replicas("main", "bench", [Replica("r1", upstream)])
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="error",
        access_log=False,
        lifespan="off",
        proxy_headers=False,
    )


# ---------------------------------------------------------------- uvicorn floor (own process)
async def hello_app(scope, receive, send):  # type: ignore[no-untyped-def]
    """The cheapest ASGI answer: what uvicorn alone costs per request on this machine."""
    if scope["type"] != "http":
        return
    await receive()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(CHAT)).encode())]}
    )
    await send({"type": "http.response.body", "body": CHAT})


def run_hello(port: int) -> None:
    import uvicorn

    uvicorn.run(
        hello_app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="error",
        access_log=False,
        lifespan="off",
        proxy_headers=False,
    )


# ---------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(port)


def _ms(v: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    assert m, v
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


LITELLM_KEY = "sk-" + "5e" * 32


def wrk(url: str, conc: int, duration: int, post: bool = False, token: str = "") -> dict[str, float]:
    lua = [f"wrk.headers['Authorization'] = 'Bearer {token}'"] if token else []
    if post:
        lua += ["wrk.method = 'POST'", f"wrk.body = '{REQ_BODY}'", "wrk.headers['Content-Type'] = 'application/json'"]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write("\n".join(lua) + "\n")
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conc}", f"-d{duration}s", "--latency", "-s", f.name, url], capture_output=True, text=True
    ).stdout
    os.unlink(f.name)
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "p50": _ms(lat["50"]),
        "p99": _ms(lat["99"]),
        "rps": rps,
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


async def _chunk_latency(port: int, path: str, token: bool) -> list[float]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    auth = b"authorization: Bearer t\r\n" if token else b""
    w.write(b"GET %s HTTP/1.1\r\nhost: x\r\n%s\r\n" % (path.encode(), auth))
    lats: list[float] = []
    buf = b""
    while len(lats) < STREAM_CHUNKS:
        data = await r.read(65536)
        if not data:
            break
        now = time.time()
        buf += data
        for m in re.finditer(rb"data: ([\d.]+)\n\n", buf):
            lats.append((now - float(m.group(1))) * 1000)
        buf = buf[buf.rfind(b"\n\n") + 2 :] if b"\n\n" in buf else buf
    w.close()
    return lats


def chunk_latency(port: int, path: str, token: bool = False) -> float:
    vals = []
    for _ in range(3):
        vals += asyncio.run(_chunk_latency(port, path, token))
    vals.sort()
    return vals[len(vals) // 2]


def start(cmd: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(10)
    except Exception:
        p.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--litellm", default="/tmp/litellm-venv", help="venv with litellm[proxy]; skipped if missing")
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--dstack", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--hello", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream-url", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.upstream:
        return run_upstream(a.upstream)
    if a.dstack:
        return run_dstack(a.dstack, a.upstream_url)
    if a.hello:
        return run_hello(a.hello)

    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    up, dp, np_, lp, hp = free_port(), free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[2] / "src")}
    procs.append(start([sys.executable, str(HERE), "--upstream", str(up)], env))
    procs.append(
        start([sys.executable, str(HERE), "--dstack", str(dp), "--upstream-url", f"http://127.0.0.1:{up}"], env)
    )
    procs.append(start([sys.executable, str(HERE), "--hello", str(hp)], env))
    peers = {
        "direct": f"http://127.0.0.1:{up}/x",
        "dstack": f"http://127.0.0.1:{dp}/services/main/bench/x",
        "uvicorn-hello": f"http://127.0.0.1:{hp}/x",
    }
    if shutil.which("nginx"):
        (tmp / "nginx.conf").write_text(f"""
worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream up {{ server 127.0.0.1:{up}; keepalive 128; }}
  server {{ listen 127.0.0.1:{np_};
    location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }} }}
}}""")
        procs.append(start(["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf")]))
        peers["nginx"] = f"http://127.0.0.1:{np_}/x"
    litellm_bin = Path(a.litellm) / "bin" / "litellm"
    if litellm_bin.exists():
        (tmp / "litellm.yaml").write_text(f"""
model_list:
  - model_name: bench-model
    litellm_params: {{model: openai/bench-model, api_base: "http://127.0.0.1:{up}/v1", api_key: x}}
litellm_settings: {{telemetry: false, drop_params: true}}
general_settings: {{master_key: "{LITELLM_KEY}"}}
""")
        procs.append(
            start(
                [
                    str(litellm_bin),
                    "--config",
                    str(tmp / "litellm.yaml"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(lp),
                    "--num_workers",
                    "1",
                ],
                {**os.environ, "LITELLM_LOG": "ERROR"},
            )
        )
    try:
        for p in (up, dp, hp):
            wait_port(p)
        if "nginx" in peers:
            wait_port(np_)
        have_litellm = litellm_bin.exists()
        if have_litellm:
            try:
                wait_port(lp, 180)
            except TimeoutError:
                have_litellm = False
                print("LiteLLM did not start within 180 s; skipped")
        d = a.duration
        rows: dict[str, dict[str, float]] = {}
        for conc in (1, 64):
            for name, url in peers.items():
                wrk(url, conc, 1)  # warm up
                rows[f"{name} c{conc}"] = wrk(url, conc, d, token="t" if name == "dstack" else "")
        # the model endpoint: POST /v1/chat/completions, routed by the `model` field
        models = {
            "direct": f"http://127.0.0.1:{up}/v1/chat/completions",
            "dstack": f"http://127.0.0.1:{dp}/models/main/v1/chat/completions",
        }
        if have_litellm:
            models["litellm"] = f"http://127.0.0.1:{lp}/v1/chat/completions"
        for conc in (1, 64):
            for name, url in models.items():
                tok = {"dstack": "t", "litellm": LITELLM_KEY}.get(name, "")
                wrk(url, conc, 1, post=True, token=tok)
                rows[f"chat {name} c{conc}"] = wrk(url, conc, d, post=True, token=tok)
        chunks = {
            "direct": chunk_latency(up, "/stream"),
            "dstack": chunk_latency(dp, "/services/main/bench/stream", True),
        }
        if "nginx" in peers:
            chunks["nginx"] = chunk_latency(np_, "/stream")
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows, chunks)


def report(rows: dict[str, dict[str, float]], chunks: dict[str, float]) -> None:
    print(f"{'scenario':24} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} {'non2xx':>7}")
    for k, v in rows.items():
        print(f"{k:24} {v['p50']:8.3f} {v['p99']:8.3f} {v['rps']:9.0f} {v['non2xx']:7.0f}")
    print()
    for prefix in ("", "chat "):
        for conc in (1, 64):
            base = rows.get(f"{prefix}direct c{conc}")
            for name in ("dstack", "nginx", "litellm", "uvicorn-hello"):
                r = rows.get(f"{prefix}{name} c{conc}")
                if base and r:
                    print(
                        f"{prefix or 'plain '}{name:8} c{conc:<3} added p50 {r['p50'] - base['p50']:7.3f} ms"
                        f"  added p99 {r['p99'] - base['p99']:7.3f} ms  req/s ratio vs direct {r['rps'] / base['rps']:.2f}"
                    )
    for conc in (1, 64):
        d, n, lite = (rows.get(f"chat {x} c{conc}") for x in ("direct", "dstack", "litellm"))
        if d and n and lite:
            print(
                f"chat c{conc}: dstack added p50 / litellm added p50 = "
                f"{(n['p50'] - d['p50']) / max(1e-9, lite['p50'] - d['p50']):.3f}; req/s dstack/litellm = {n['rps'] / lite['rps']:.1f}x"
            )
    for conc in (1, 64):
        n, x, h = rows.get(f"dstack c{conc}"), rows.get(f"nginx c{conc}"), rows.get(f"uvicorn-hello c{conc}")
        if n and x:
            print(f"plain c{conc}: dstack req/s / nginx req/s = {n['rps'] / x['rps']:.2f}")
        if n and h:
            print(
                f"plain c{conc}: dstack req/s / uvicorn hello-world req/s = {n['rps'] / h['rps']:.2f} (the floor under uvicorn)"
            )
    print(
        "\nstreamed chunk latency (median, send→receive):",
        ", ".join(f"{k} {v:.3f} ms" for k, v in chunks.items()),
        f"→ dstack adds {chunks['dstack'] - chunks['direct']:.3f} ms per chunk",
    )
    print(json.dumps({"rows": rows, "chunks": chunks}))


if __name__ == "__main__":
    main()
