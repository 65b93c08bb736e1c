"""Why the proxy has its own HTTP client: µs per request (keep-alive) of httpx, aiohttp and
dstack.proxy.upstream against the same tiny upstream, sequential and 32 concurrent.

    cd /work/main && PYTHONPATH=src .venv/bin/python bench/proxy/bench_clients.py
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import uvloop

from dstack.proxy.upstream import UpstreamPool

HERE = Path(__file__).resolve().parent
N = 3000


async def run_httpx(url: str, conc: int) -> float:
    async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=64)) as c:
        return await _drive(lambda: c.get(url), conc)


async def run_aiohttp(url: str, conc: int) -> float:
    async with aiohttp.ClientSession() as s:

        async def one():
            async with s.get(url) as r:
                await r.read()

        return await _drive(one, conc)


async def run_own(port: int, conc: int) -> float:
    pool = UpstreamPool()
    key = ("http", "127.0.0.1", port)

    async def one():
        conn, _ = await pool.acquire(key)
        conn.write(b"GET /x HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        await conn.read_head(10)
        await conn.read_all(10)
        pool.release(conn)

    try:
        return await _drive(one, conc)
    finally:
        pool.close()


async def _drive(fn, conc: int) -> float:
    for _ in range(100):
        await fn()
    sem = asyncio.Semaphore(conc)

    async def guarded():
        async with sem:
            await fn()

    t0 = time.perf_counter()
    await asyncio.gather(*[guarded() for _ in range(N)])
    return (time.perf_counter() - t0) / N * 1e6


def main() -> None:
    sys.path.insert(0, str(HERE))
    from bench_proxy import free_port, wait_port

    port = free_port()
    up = subprocess.Popen([sys.executable, str(HERE / "bench_proxy.py"), "--upstream", str(port)])
    try:
        wait_port(port)
        url = f"http://127.0.0.1:{port}/x"
        for conc in (1, 32):
            res = {
                "httpx": uvloop.run(run_httpx(url, conc)),
                "aiohttp": uvloop.run(run_aiohttp(url, conc)),
                "dstack.proxy.upstream": uvloop.run(run_own(port, conc)),
            }
            print(f"concurrency {conc}: " + ", ".join(f"{k} {v:.0f} µs/req" for k, v in res.items()))
    finally:
        up.terminate()


if __name__ == "__main__":
    main()
