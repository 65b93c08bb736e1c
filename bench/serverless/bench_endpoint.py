"""Serverless endpoints through the whole product: a real `dstack server`, its agent, workers that
are dstack jobs running an unmodified runpod==1.12.0 handler, and clients over HTTP.

Measures, in the same run:
- cold start: `runsync` sent at zero workers → result, for an endpoint whose workers start from
  the agent's warm zygote (the default) and for the same endpoint with DSTACK_PREWARM=0 (the peer:
  a plain `python handler.py`), alternating rounds;
- dispatch with a warm idle worker: submit → handler starts (the handler reports its start time),
  against the direct in-process call;
- throughput: a no-op async handler, concurrency_modifier 50, three warm workers.

Usage: .venv/bin/python bench/serverless/bench_endpoint.py [--cold 5] [--dispatch 100] [--jobs 2000]
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "src"), str(ROOT)]
from conftest import make_server  # noqa: E402

from dstack.api import Resources, Serverless  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serverless import direct_baseline, pct, submit_with_sdk  # noqa: E402
from serverless.helpers import live_workers, wait_until  # noqa: E402

HANDLER = """
import time
import runpod


async def handler(job):
    return {"started": time.time(), "echo": job["input"]}


runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda current: 50})
"""


def deploy(srv, tmp: Path, name: str, workers: str, env: dict | None = None):
    repo = tmp / name
    repo.mkdir()
    (repo / "handler.py").write_text(HANDLER)
    conf = Serverless(
        setup=["pip install -q runpod==1.12.0"],
        commands=["python handler.py"],
        workers=workers,
        idle_timeout=1,
        resources=Resources(cpu=0, memory="0.3GB"),
        env=env or {},
    )
    return srv.client().runs.submit(conf, run_name=name, repo_dir=repo)


def health(srv, run) -> dict:
    return httpx.get(f"{run.endpoint_url}/health", headers=srv.headers, timeout=30).json()


def cold_start(srv, run) -> float:
    wait_until(lambda: live_workers(health(srv, run)) == 0, 120, what=f"{run.name} at zero workers")
    time.sleep(0.5)
    t0 = time.time()
    r = httpx.post(f"{run.endpoint_url}/runsync?wait=300000", headers=srv.headers, json={"input": "cold"}, timeout=330)
    body = r.json()
    assert body["status"] == "COMPLETED", body
    return time.time() - t0


def dispatch(srv, run, n: int) -> list[float]:
    out = []
    import random

    with httpx.Client(headers=srv.headers, timeout=60) as c:
        for i in range(n):
            time.sleep(random.uniform(0.05, 0.25))  # don't fall into step with the SDK's 100 ms loop
            t0 = time.time()
            body = c.post(f"{run.endpoint_url}/runsync", json={"input": i}).json()
            out.append(body["output"]["started"] - t0)
    return out


async def _throughput(srv, run, n: int) -> float:
    """Submit `n` jobs with the runpod SDK's async client; seconds until all are COMPLETED."""
    t0 = time.time()
    await submit_with_sdk(run.endpoint_url.rsplit("/", 1)[0], run.name, srv.token, n)
    async with httpx.AsyncClient(headers=srv.headers, timeout=120) as c:
        while True:
            h = (await c.get(f"{run.endpoint_url}/health")).json()
            if h["jobs"]["completed"] >= n:
                return time.time() - t0
            await asyncio.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cold", type=int, default=5)
    ap.add_argument("--dispatch", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--out", default=str(Path(__file__).with_name("last-run-endpoint.json")))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-endpoint-"))
    srv = make_server(tmp)
    srv.start()
    result: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_before": os.getloadavg(),
    }
    try:
        warm = deploy(srv, tmp, "bench-warm", "0..1")
        plain = deploy(srv, tmp, "bench-plain", "0..1", {"DSTACK_PREWARM": "0"})
        t0 = time.time()
        first = httpx.post(
            f"{warm.endpoint_url}/runsync?wait=300000", headers=srv.headers, json={"input": "first"}, timeout=330
        )
        result["first_worker_ever_s"] = time.time() - t0  # pays the pip install of runpod
        assert first.json()["status"] == "COMPLETED", first.text
        print(f"first worker ever (pip install runpod, then start): {result['first_worker_ever_s']:.1f} s", flush=True)
        warm_s, plain_s = [], []
        for i in range(args.cold):
            warm_s.append(cold_start(srv, warm))
            plain_s.append(cold_start(srv, plain))
            print(
                f"cold start round {i + 1}: warm zygote {warm_s[-1]:.2f} s, plain python {plain_s[-1]:.2f} s",
                flush=True,
            )
        result["cold_start_s"] = {
            "prewarm": warm_s,
            "plain": plain_s,
            "prewarm_p50": statistics.median(warm_s),
            "plain_p50": statistics.median(plain_s),
        }
        print(
            f"cold start p50: warm zygote {statistics.median(warm_s):.2f} s vs plain {statistics.median(plain_s):.2f} s "
            f"(ratio {statistics.median(warm_s) / statistics.median(plain_s):.2f})",
            flush=True,
        )
        warm.stop(abort=True)
        plain.stop(abort=True)

        steady = deploy(srv, tmp, "bench-steady", "3..3")
        stock = deploy(srv, tmp, "bench-stock", "1..1", {"DSTACK_RUNPOD_LOOP": "0"})  # the SDK's own loops
        wait_until(
            lambda: health(srv, steady)["workers"]["idle"] == 3 and health(srv, stock)["workers"]["idle"] == 1,
            300,
            what="idle workers",
        )
        direct = [x * 1000 for x in direct_baseline()]
        for key, run in (("dispatch_ms", steady), ("dispatch_ms_stock_loop", stock)):
            d = [x * 1000 for x in dispatch(srv, run, args.dispatch)]
            result[key] = {"p50": pct(d, 50), "p99": pct(d, 99), "direct_call_p50": pct(direct, 50)}
            print(
                f"dispatch submit -> handler start, warm idle worker ({run.name}): p50 {pct(d, 50):.1f} ms, "
                f"p99 {pct(d, 99):.1f} ms (direct in-process call: {pct(direct, 50) * 1000:.1f} us)",
                flush=True,
            )
        stock.stop(abort=True)
        elapsed = asyncio.run(_throughput(srv, steady, args.jobs))
        result["throughput_jobs_per_s"] = args.jobs / elapsed
        print(
            f"throughput: {args.jobs} jobs in {elapsed:.1f} s = {args.jobs / elapsed:.0f} jobs/s "
            f"(3 workers x concurrency 50, no-op async handler)",
            flush=True,
        )
        steady.stop(abort=True)
    finally:
        result["load_after"] = os.getloadavg()
        srv.stop()
        srv.kill_agents()
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
