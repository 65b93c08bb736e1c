"""Dashboard benchmark: the runs page's first render with 10,000 runs stored, against the JSON API
for the same list in the same run; and a run page following a job that prints 1,000 lines/s, with
the browser's JS heap sampled while it streams (it must not grow without bound).

Usage: python bench/web/bench_dashboard.py [--stored 10000] [--stream-seconds 60]
Needs Chromium (Debian's /usr/bin/chromium) and playwright for the streaming part.
"""

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT), str(ROOT / "bench")]
from bench_core import store_runs  # noqa: E402
from conftest import make_server  # noqa: E402

from dstack.api import Resources, Task  # noqa: E402

# 1,000 lines a second, in 10 writes of 100 lines
FIREHOSE = (
    'python -u -c "import sys,time\n'
    "i=0\n"
    "while True:\n"
    "    sys.stdout.write(''.join(f'line {i+k} ' + 'x'*60 + chr(10) for k in range(100))); i+=100\n"
    '    time.sleep(0.1)"'
)


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def ms(values: list[float]) -> str:
    return f"first {values[0] * 1000:.0f} ms, median {statistics.median(values) * 1000:.0f} ms"


def runs_page(srv, stored: int) -> None:
    asyncio.run(store_runs(srv.env.get("DSTACK_DATABASE_URL") or _sqlite_url(srv), "main", "admin", stored))
    web = httpx.Client(base_url=srv.url, timeout=60)
    assert web.post("/signin", data={"token": srv.token}).status_code == 303
    api = httpx.Client(base_url=srv.url, headers=srv.headers, timeout=120)

    def page() -> None:
        r = web.get("/runs?status=all")
        assert r.status_code == 200 and "stored-" in r.text, r.status_code

    def api_same() -> None:  # the page shows the newest 100: the API call for that list
        r = api.post("/api/runs/list", json={"limit": 100})
        assert r.status_code == 200 and len(r.json()) == 100

    def api_all() -> None:
        r = api.post("/api/runs/list", json={"limit": 10_000})
        assert r.status_code == 200

    p = timed(page, 10)
    a = timed(api_same, 10)
    b = timed(api_all, 3)
    print(f"runs page (newest 100 of {stored} stored), HTML:   {ms(p)}")
    print(f"JSON API, the same 100 runs:                    {ms(a)}")
    print(f"JSON API, all {stored} runs:                     {ms(b)}")
    print(f"ratio page/API (same list), medians: {statistics.median(p) / statistics.median(a):.2f}x")
    print(f"target: first render <= 1 s: {'met' if p[0] <= 1.0 else 'NOT met'}")


def _sqlite_url(srv) -> str:
    return f"sqlite+aiosqlite:///{srv.home / 'server' / 'data' / 'sqlite.db'}"


def stream(srv, seconds: int, repo: Path) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        print("streaming: skipped (no chromium)")
        return
    repo.mkdir(exist_ok=True)
    run = srv.client().runs.submit(
        Task(commands=[FIREHOSE], resources=Resources(cpu=0, memory="0.2GB")), run_name="firehose", repo_dir=repo
    )
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(srv.url + "/signin")
        page.get_by_label("Token").fill(srv.token)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url("**/runs")
        page.goto(srv.url + "/runs/main/firehose")
        page.get_by_label("Log output").wait_for()
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")
        samples = []
        t0 = time.time()
        while time.time() - t0 < seconds:
            time.sleep(5)
            cdp.send("HeapProfiler.collectGarbage")
            metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
            last = page.evaluate("(document.getElementById('log').textContent.match(/line (\\d+) x+\\s*$/)||[])[1]")
            samples.append((time.time() - t0, metrics["JSHeapUsedSize"] / 2**20, metrics["Nodes"], last))
            print(
                f"  t={samples[-1][0]:4.0f}s heap {samples[-1][1]:6.1f} MiB  DOM nodes {samples[-1][2]:.0f}  last line {last}"
            )
        browser.close()
    run.stop(abort=True)
    first, end = samples[0], samples[-1]
    print(
        f"streaming {seconds} s at ~1,000 lines/s: heap {first[1]:.1f} -> {end[1]:.1f} MiB, DOM nodes {first[2]:.0f} -> {end[2]:.0f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stored", type=int, default=10_000)
    ap.add_argument("--stream-seconds", type=int, default=60)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dstack-bench-web-"))
    srv = make_server(tmp)
    srv.start()
    try:
        runs_page(srv, args.stored)
        if args.stream_seconds:
            stream(srv, args.stream_seconds, tmp / "repo")
    finally:
        srv.stop()
        srv.kill_agents()


if __name__ == "__main__":
    main()
