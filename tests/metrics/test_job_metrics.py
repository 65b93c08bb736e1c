"""Job metrics through the whole product: agent samples -> server collector -> API, `/metrics`, CLI.

A real server and agent; the job busy-loops in Python and prints its own CPU time as it goes, so
what the server reports is checked against what the job really got (one core on an idle host;
this shared test host may give it less).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SRC, ServerProcess, running_server
from tests.util import wait_for

BUSY = (
    "python3 -c 'import time\n"
    "end = time.time() + 90\n"
    "mark = 0\n"
    "while time.time() < end:\n"
    "    if time.time() > mark:\n"
    '        print("cpu", time.time(), time.process_time(), flush=True)\n'
    "        mark = time.time() + 0.5'"
)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(
        tmp_path_factory.mktemp("metrics"),
        request.param,
        DSTACK_SERVER_METRICS_INTERVAL="1",
        DSTACK_AGENT_METRICS_INTERVAL="0.5",
    ) as srv:
        yield srv


def _post(srv: ServerProcess, path: str, body: Any = None) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json=body or {}, headers=srv.headers, timeout=60)


def _metrics(srv: ServerProcess, run_name: str, **params: Any) -> dict[str, Any]:
    r = httpx.get(f"{srv.url}/api/project/main/metrics/job/{run_name}", params=params, headers=srv.headers, timeout=30)
    assert r.status_code == 200, r.text
    return {m["name"]: m for m in r.json()["metrics"]}


def _wait_samples(srv: ServerProcess, run_name: str, n: int = 8, timeout: float = 120) -> dict[str, Any]:
    """The run's metric series once it has at least `n` CPU samples (up to the newest 100)."""
    return wait_for(
        lambda: _metrics(srv, run_name, limit=100),
        lambda series: len(series.get("cpu_usage_percent", {}).get("values", [])) >= n,
        timeout,
        interval=1,
    )


def _job_cpu_lines(srv: ServerProcess, run_name: str) -> list[tuple[float, float]]:
    import base64

    r = _post(srv, "/api/project/main/logs/poll", {"run_name": run_name, "limit": 1000})
    text = b"".join(base64.b64decode(e["message"]) for e in r.json()["logs"]).decode()
    return [(float(p[1]), float(p[2])) for p in (line.split() for line in text.splitlines()) if p and p[0] == "cpu"]


def _cli(srv: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(srv.env)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_busy_job_cpu_in_api_prometheus_and_cli(server: ServerProcess, tmp_path: Path) -> None:
    run_name = f"busy-{uuid.uuid4().hex[:6]}"
    conf = {
        "type": "task",
        "name": run_name,
        "commands": [BUSY],
        "resources": {"cpu": "1..", "memory": "0.5GB..", "disk": "1GB.."},
    }
    r = _post(server, "/api/project/main/runs/submit", {"run_spec": {"configuration": conf}})
    assert r.status_code == 200, r.text
    try:
        series = _wait_samples(server, run_name)
        cpu = series["cpu_usage_percent"]
        assert cpu["timestamps"] == sorted(cpu["timestamps"], reverse=True)  # newest first, as dstack
        assert series["memory_usage_bytes"]["values"][0] > 1_000_000
        assert series["cpus_detected_num"]["values"][0] >= 1

        # What the job itself measured over the same stretch of time.
        from datetime import datetime

        stamps = [datetime.fromisoformat(t).timestamp() for t in cpu["timestamps"]][:-1]  # skip the oldest
        lines = [(t, c) for t, c in _job_cpu_lines(server, run_name) if min(stamps) <= t <= max(stamps)]
        assert len(lines) >= 3, lines
        job_percent = (lines[-1][1] - lines[0][1]) / (lines[-1][0] - lines[0][0]) * 100
        reported = sum(cpu["values"][:-1]) / len(cpu["values"][:-1])
        assert abs(reported - job_percent) <= max(12.0, 0.25 * job_percent), (reported, job_percent)
        assert reported <= 130  # one thread cannot use more than one core

        # Prometheus: the running job's latest point, labelled with its run and project.
        text = httpx.get(f"{server.url}/metrics", headers=server.headers, timeout=30).text
        lines_out = [ln for ln in text.splitlines() if f'dstack_run_name="{run_name}"' in ln]
        names = {ln.split("{")[0] for ln in lines_out}
        assert {"dstack_job_cpu_usage_percent", "dstack_job_memory_usage_bytes"} <= names, text[-2000:]
        assert all('dstack_project_name="main"' in ln for ln in lines_out)
        assert "# TYPE dstack_job_cpu_time_seconds_total counter" in text

        # The CLI's table: the job's row with a CPU percentage.
        out = _cli(server, "metrics", run_name)
        assert out.returncode == 0, out.stderr
        row = next(ln for ln in out.stdout.splitlines() if ln.startswith("replica=0 job=0"))
        assert "running" in row and "%" in row, out.stdout
        shown = float(row.split()[3].rstrip("%"))
        assert 0 < shown <= 150, row
    finally:
        _post(server, "/api/project/main/runs/stop", {"runs_names": [run_name], "abort": True})


def test_unknown_run_and_project(server: ServerProcess) -> None:
    r = httpx.get(f"{server.url}/api/project/main/metrics/job/nope", headers=server.headers, timeout=30)
    assert r.status_code == 404 and "nope" in r.text
    r = httpx.get(f"{server.url}/api/project/other/metrics/job/nope", headers=server.headers, timeout=30)
    assert r.status_code == 403
    r = httpx.get(f"{server.url}/api/project/main/metrics/job/nope", timeout=30)
    assert r.status_code == 401
