"""Serverless queue benchmark: dispatch latency, throughput, cold start.

Runs the test server (tests/serverless/server_app.py: router + ServerlessService + SQLite) in a
subprocess with real runpod==1.12.0 workers, and compares against calling the handler directly
in-process. Usage: PYTHONPATH=src .venv/bin/python bench/serverless/bench_serverless.py [--jobs N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
from serverless.helpers import TOKEN, Server, endpoint, live_workers, wait_until  # noqa: E402

logging.getLogger("httpx").setLevel(logging.WARNING)  # runpod's import turns on a line per request


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def direct_baseline(n: int = 2000) -> list[float]:
    """Submit → handler start when the handler is an in-process coroutine call."""

    started: list[float] = []

    async def handler(job: dict) -> dict:
        started.append(time.perf_counter())
        return {"echo": job["input"]}

    async def main() -> list[float]:
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            await handler({"id": str(i), "input": {"i": i}})
            out.append(started[-1] - t0)
        return out

    return asyncio.run(main())


def bench_dispatch(srv: Server, n: int, ep: str = "b-dispatch") -> dict:
    import random

    lat, rtt = [], []
    for i in range(n):
        time.sleep(random.uniform(0, 0.2))  # break the phase lock with the SDK's 100 ms run loop
        t0 = time.time()
        r = srv.client.post(f"/{ep}/runsync", json={"input": {"mode": "echo", "i": i}})
        t1 = time.time()
        body = r.json()
        assert body["status"] == "COMPLETED", body
        lat.append(body["output"]["started"] - t0)
        rtt.append(t1 - t0)
    return {"dispatch_ms": [x * 1000 for x in lat], "runsync_ms": [x * 1000 for x in rtt]}


def bench_raw_dispatch(srv: Server, n: int) -> list[float]:
    """Server-side dispatch without the SDK: a hand-driven worker long-polls job-take itself and
    notes when the job arrives; submit → arrival isolates the queue from the SDK's own loops."""
    import threading

    env_file = wait_until(
        lambda: next(iter(srv.run_dir.glob("b-raw-*.env.json")), None), timeout=20, what="raw worker env"
    )
    env = json.loads(env_file.read_text())
    wid = env["RUNPOD_POD_ID"]
    take = env["RUNPOD_WEBHOOK_GET_JOB"].replace("$ID", wid) + "&job_in_progress=0"
    done_tpl = env["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", wid)
    arrivals: dict[int, float] = {}
    stop = threading.Event()

    def worker() -> None:
        with httpx.Client(headers={"Authorization": env["RUNPOD_AI_API_KEY"]}, timeout=60) as c:
            while not stop.is_set():
                r = c.get(take)
                if r.status_code == 200:
                    job = r.json()
                    arrivals[job["input"]["i"]] = time.time()
                    c.post(done_tpl.replace("$ID", job["id"]) + "&isStream=false", content=json.dumps({"output": 1}))

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    time.sleep(0.5)
    lat = []
    for i in range(n):
        t0 = time.time()
        srv.client.post("/b-raw/run", json={"input": {"i": i}})
        wait_until(lambda i=i: i in arrivals, timeout=10, interval=0.0005, what="raw arrival")
        lat.append((arrivals[i] - t0) * 1000)
        time.sleep(0.02)
    stop.set()
    return lat


async def submit_with_sdk(v2_url: str, endpoint_id: str, token: str, n: int, concurrency: int = 32) -> float:
    """Submit `n` jobs with the runpod SDK's own async client (aiohttp), `concurrency` at a time;
    returns the seconds it took."""
    import aiohttp
    import runpod
    from runpod.endpoint.asyncio.asyncio_runner import Endpoint as AsyncEndpoint

    runpod.endpoint_url_base = v2_url
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        ep = AsyncEndpoint(endpoint_id, session, api_key=token)

        async def one(i: int) -> None:
            async with sem:
                await ep.run({"mode": "echo", "i": i})

        t0 = time.time()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.time() - t0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_throughput(srv: Server, n: int, ep: str = "b-tput") -> dict:
    """Submit `n` jobs (the runpod SDK's async client) while the endpoint's workers drain them."""
    base = srv.health(ep)["jobs"]["completed"]
    cpu0 = cpu_seconds(srv.proc.pid)
    t0 = time.time()
    submit_s = asyncio.run(submit_with_sdk(srv.url + "/v2", ep, TOKEN, n))
    wait_until(lambda: srv.health(ep)["jobs"]["completed"] - base >= n, timeout=600, interval=0.05, what="drain")
    total = time.time() - t0
    cpu_ms = (cpu_seconds(srv.proc.pid) - cpu0) * 1000 / n
    return {
        "jobs": n,
        "submit_s": submit_s,
        "total_s": total,
        "jobs_per_s": n / total,
        "submit_per_s": n / submit_s,
        "server_cpu_ms_per_job": cpu_ms,
        "jobs_per_s_per_server_core": 1000 / cpu_ms,
    }


def bench_cold(srv: Server, rounds: int) -> list[float]:
    out = []
    for i in range(rounds):
        wait_until(
            lambda: live_workers(srv.health("b-cold")) == 0 and sum(srv.health("b-cold")["workers"].values()) == 0,
            timeout=60,
            what="zero workers",
        )
        t0 = time.time()
        r = srv.client.post("/b-cold/runsync", json={"input": {"mode": "echo", "i": i}})
        assert r.json()["status"] == "COMPLETED", r.text
        out.append(time.time() - t0)
    return out


def sdk_import_s() -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-c", "import runpod.serverless"], check=True)
    return time.time() - t0


def fresh_postgres_database(server_url: str) -> str:
    from tests.pg import fresh_database

    return fresh_database(server_url, "dstack_bench").replace("postgresql://", "postgresql+asyncpg://", 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--dispatch", type=int, default=200)
    ap.add_argument("--cold", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).with_name("last-run.json")))
    ap.add_argument("--postgres", help="a PostgreSQL server URL: run on a fresh database there instead of SQLite")
    args = ap.parse_args()
    database_url = fresh_postgres_database(args.postgres) if args.postgres else None
    load_before = os.getloadavg()
    stock = {"DSTACK_RUNPOD_LOOP": "0"}  # the peer: the SDK's own polling loops
    eps = {
        "b-dispatch": endpoint("async_worker.py", 1, 1, env={"WORKER_CONCURRENCY": "4"}),
        "b-dispatch-stock": endpoint("async_worker.py", 1, 1, env={"WORKER_CONCURRENCY": "4", **stock}),
        "b-tput": endpoint("async_worker.py", 3, 3, env={"WORKER_CONCURRENCY": "50"}),
        "b-tput-stock": endpoint("async_worker.py", 3, 3, env={"WORKER_CONCURRENCY": "50", **stock}),
        "b-raw": {"script": "-", "settings": {"workers_min": 1, "workers_max": 1}},
        "b-cold": endpoint("async_worker.py", 0, 1, env={"WORKER_CONCURRENCY": "1"}, idle_timeout=0.5),
    }
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "database": "postgresql" if database_url else "sqlite",
        "load_before": load_before,
    }
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp), eps, options={"take_wait": 20.0}, database_url=database_url).start()
        try:
            wait_until(
                lambda: all(
                    srv.health(e)["workers"]["idle"] == k
                    for e, k in (("b-tput", 3), ("b-tput-stock", 3), ("b-dispatch", 1), ("b-dispatch-stock", 1))
                ),
                timeout=90,
                what="warm workers",
            )
            time.sleep(1)
            results["sdk_import_s"] = sdk_import_s()
            cold = bench_cold(srv, args.cold)
            results["cold_start_s"] = {"p50": statistics.median(cold), "min": min(cold), "max": max(cold), "all": cold}
            raw = bench_raw_dispatch(srv, args.dispatch)
            results["server_dispatch_ms"] = {"p50": pct(raw, 50), "p99": pct(raw, 99)}
            for key, ep in (("", "b-dispatch"), ("_stock_loop", "b-dispatch-stock")):
                d = bench_dispatch(srv, args.dispatch, ep)
                results["dispatch_ms" + key] = {"p50": pct(d["dispatch_ms"], 50), "p99": pct(d["dispatch_ms"], 99)}
                results["runsync_roundtrip_ms" + key] = {
                    "p50": pct(d["runsync_ms"], 50),
                    "p99": pct(d["runsync_ms"], 99),
                }
            results["throughput"] = bench_throughput(srv, args.jobs, "b-tput")
            results["throughput_stock_loop"] = bench_throughput(srv, args.jobs, "b-tput-stock")
        finally:
            srv.close()
    base = direct_baseline()
    results["direct_call_us"] = {"p50": pct(base, 50) * 1e6, "p99": pct(base, 99) * 1e6}
    results["dispatch_vs_direct_ratio_p50"] = (
        results["dispatch_ms"]["p50"] * 1000 / max(results["direct_call_us"]["p50"], 1e-3)
    )
    results["server_dispatch_vs_direct_ratio_p50"] = (
        results["server_dispatch_ms"]["p50"] * 1000 / max(results["direct_call_us"]["p50"], 1e-3)
    )
    results["dispatch_vs_stock_loop_ratio_p50"] = (
        results["dispatch_ms"]["p50"] / results["dispatch_ms_stock_loop"]["p50"]
    )
    results["throughput_vs_stock_loop_ratio"] = (
        results["throughput"]["jobs_per_s"] / results["throughput_stock_loop"]["jobs_per_s"]
    )
    results["load_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
