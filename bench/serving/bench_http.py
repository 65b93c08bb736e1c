"""What the HTTP layer costs, per token and per request: one server, one client, requests in a row.

For `python -m dstack.serving` (or any server: `--url`) it sends `--requests` streamed, greedy
`/v1/completions` requests of `--new-tokens` tokens one after another, then as many of 2 tokens,
and reports tokens/s, TTFT p50 of both kinds, and the CPU time each thread of the server process
used per generated token (from /proc: the event loop's thread is the process's main thread).
`--pid` names the process when `--url` is given (llama-server: its HTTP threads vs its workers).

    PYTHONPATH=src .venv/bin/python bench/serving/bench_http.py --threads 2
    PYTHONPATH=/tmp/old/src .venv/bin/python bench/serving/bench_http.py   # another checkout
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import PROMPTS, ServerProc, free_port, stream_texts  # noqa: E402


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread, keyed `main` for the process's main thread, else by thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = defaultdict(float)
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        key = "main" if int(tid) == pid else name
        out[key] += (int(fields[11]) + int(fields[12])) / tick
    return out


async def run(url: str, requests: int, n: int) -> tuple[int, float, list[float]]:
    async with httpx.AsyncClient(timeout=600) as client:
        total, ttfts = 0, []
        t0 = time.perf_counter()
        for k in range(requests):
            body = {"prompt": PROMPTS[k % len(PROMPTS)], "max_tokens": n, "temperature": 0, "stream": True}
            texts, ttft = await stream_texts(client, url + "/v1/completions", body, lambda c: c.get("text"))
            total += len(texts)
            ttfts.append(ttft)
        return total, time.perf_counter() - t0, ttfts


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None, help="measure this server instead of starting dstack's")
    ap.add_argument("--pid", type=int, default=None, help="the server's process (with --url)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    server = None
    url, pid = a.url, a.pid
    if url is None:
        port = free_port()
        cmd = [sys.executable, "-m", "dstack.serving", "--model", "SmolLM2-135M-Instruct", "--host", "127.0.0.1"]
        server = ServerProc("dstack-http", cmd + ["--port", str(port), "--threads", str(a.threads)], port)
        server.wait_ready(120)
        url, pid = server.url, server.proc.pid
    try:
        asyncio.run(run(url, 3, 8))  # warm-up
        for n in (a.new_tokens, 2):
            before = thread_cpu(pid) if pid else {}
            tokens, seconds, ttfts = asyncio.run(run(url, a.requests, n))
            after = thread_cpu(pid) if pid else {}
            per_token = {k: 1e3 * (after[k] - before.get(k, 0.0)) / tokens for k in after}
            cpu = ", ".join(f"{k} {v:.3f}" for k, v in sorted(per_token.items(), key=lambda kv: -kv[1]) if v > 0)
            print(
                f"{n:3d} tokens x {a.requests}: {tokens / seconds:6.1f} tok/s, TTFT p50 "
                f"{1e3 * statistics.median(ttfts):5.1f} ms; CPU ms per token by thread: {cpu}  "
                f"(load {os.getloadavg()[0]:.2f})",
                flush=True,
            )
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
