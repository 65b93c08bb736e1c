"""Job start latency on one agent: from `POST /start` to the process spawned and to user code running.

    python bench/agent/bench_start_latency.py [--samples 20]

Starts a real agent in a temporary home, warms the default Python's cached venv with one job, then
starts `--samples` jobs that print `time.time()` and reports the medians and p90s. (This was
`tests/agent/test_start_latency`, which only printed; the test now checks the timestamps' order.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
from dstack.agent.launcher import start_agent  # noqa: E402
from tests.agent.test_agent import TOKEN, _stop_agent, run, submit, text, wait_final  # noqa: E402


def measure(client: httpx.Client, samples: int) -> tuple[list[float], list[float]]:
    run(client, ["true"])  # venv and pip bundle for the default python are cached from here on
    spawned, python_up = [], []
    for _ in range(samples):
        job_id = submit(client, ["python -c 'import time; print(time.time())'"], start=False)
        t0 = time.time()
        client.post(f"/api/jobs/{job_id}/start")
        resp, records = wait_final(client, job_id)
        spawned.append(resp["started_at"] - t0)
        python_up.append(float(text(records)) - t0)
    return spawned, python_up


def _summary(name: str, values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    return f"{name}: median {statistics.median(ms):.0f} ms, p90 {p90:.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        info = start_agent(Path(tmp) / "home", TOKEN)
        try:
            with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
                spawned, python_up = measure(c, args.samples)
        finally:
            _stop_agent(info)
    print(f"job start latency over {args.samples} jobs after /start")
    print(_summary("process spawned", spawned))
    print(_summary("python in the job's venv running user code", python_up))


if __name__ == "__main__":
    main()
