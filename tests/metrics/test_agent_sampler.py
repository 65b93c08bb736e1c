"""The agent's per-job samples: a real agent process, real jobs, `GET /api/jobs/{id}/metrics`."""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dstack.agent.launcher import AgentInfo, start_agent
from dstack.agent.metrics import NvidiaSmi, parse_nvidia_smi
from tests.agent.test_agent import _stop_agent

TOKEN = "metrics-test-token"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentInfo]:
    os.environ["DSTACK_AGENT_METRICS_INTERVAL"] = "0.5"  # the agent process inherits it
    try:
        info = start_agent(tmp_path_factory.mktemp("agent-home"), TOKEN)
    finally:
        del os.environ["DSTACK_AGENT_METRICS_INTERVAL"]
    yield info
    _stop_agent(info)


@pytest.fixture
def http(agent: AgentInfo) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
        yield c


def _start(http: httpx.Client, commands: list[str]) -> str:
    job_id = f"m-{uuid.uuid4().hex[:10]}"
    r = http.post("/api/jobs", json={"job_id": job_id, "run_name": "metrics", "commands": commands})
    assert r.status_code == 200, r.text
    assert http.post(f"/api/jobs/{job_id}/start").status_code == 200
    return job_id


def _samples(http: httpx.Client, job_id: str, count: int, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    samples: list[dict] = []
    while time.monotonic() < deadline:
        r = http.get(f"/api/jobs/{job_id}/metrics")
        assert r.status_code == 200, r.text
        samples = r.json()["samples"]
        if len(samples) >= count:
            return samples
        time.sleep(0.5)
    raise AssertionError(f"only {len(samples)} samples of job {job_id} after {timeout}s")


BUSY_JOB = (
    "python3 -c 'import time\n"
    "b = bytearray(200 * 2**20)\n"
    'b[::4096] = b"x" * len(b[::4096])\n'
    "end = time.time() + 60\n"
    "mark = 0\n"
    "while time.time() < end:\n"
    "    if time.time() > mark:\n"
    "        print(time.time(), time.process_time(), flush=True)\n"
    "        mark = time.time() + 0.25'"
)


def _job_lines(http: httpx.Client, job_id: str) -> list[tuple[float, float]]:
    """The job's own (wall time, its CPU seconds) lines, from its logs."""
    import base64

    r = http.get(f"/api/jobs/{job_id}/pull", params={"cursor": 0, "limit": 5000})
    out = b"".join(base64.b64decode(rec["data"]) for rec in r.json()["logs"] if rec["stream"] == "stdout")
    return [(float(a), float(b)) for a, b in (line.split() for line in out.decode().splitlines())]


def test_busy_child_reads_its_cpu_share_and_its_memory(http: httpx.Client) -> None:
    # The work happens in a grandchild (bash -> python), holding ~200 MB: the tree is measured.
    # The job reports its own CPU time as it goes: on an idle host it is one core (100 %); this
    # shared test host may give it less, and the agent must read what it really got.
    job_id = _start(http, [BUSY_JOB])
    try:
        samples = _samples(http, job_id, 10)[2:]  # after start-up
        first, last = samples[0], samples[-1]
        agent_rate = (last["cpu_seconds"] - first["cpu_seconds"]) / (last["ts"] - first["ts"]) * 100
        lines = [(t, c) for t, c in _job_lines(http, job_id) if first["ts"] <= t <= last["ts"]]
        assert len(lines) >= 4, lines
        (t0, c0), (t1, c1) = lines[0], lines[-1]
        job_rate = (c1 - c0) / (t1 - t0) * 100
        assert abs(agent_rate - job_rate) <= max(10.0, 0.2 * job_rate), (agent_rate, job_rate)
        mean_percent = statistics.mean(s["cpu_percent"] for s in samples[1:])
        assert abs(mean_percent - agent_rate) <= max(10.0, 0.2 * agent_rate), (mean_percent, agent_rate)
        assert 10 <= job_rate <= 110 and max(s["cpu_percent"] for s in samples) <= 150
        assert all(s["memory_bytes"] >= 200 * 2**20 for s in samples), [s["memory_bytes"] for s in samples]
        assert [s["ts"] for s in samples] == sorted(s["ts"] for s in samples)
        after = samples[-2]["ts"]
        newer = http.get(f"/api/jobs/{job_id}/metrics", params={"after": after}).json()["samples"]
        assert newer and all(s["ts"] > after for s in newer)
    finally:
        http.post(f"/api/jobs/{job_id}/stop", json={"abort": True})


def test_idle_job_reads_near_zero(http: httpx.Client) -> None:
    job_id = _start(http, ["sleep 60"])
    try:
        samples = _samples(http, job_id, 4)
        assert max(s["cpu_percent"] for s in samples) < 15, samples
        assert all(s["gpus"] == [] for s in samples)
    finally:
        http.post(f"/api/jobs/{job_id}/stop", json={"abort": True})


def test_unknown_job_and_auth(http: httpx.Client, agent: AgentInfo) -> None:
    assert http.get("/api/jobs/nope/metrics").status_code == 404
    assert httpx.get(f"{agent.url}/api/jobs/nope/metrics").status_code == 401


def test_nvidia_smi_output_is_parsed(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0, 87, 1024, 81920\\n1, [N/A], 0, 81920\\n'\n")
    fake.chmod(0o755)
    readings = NvidiaSmi(str(fake)).read()
    assert readings[0].util_percent == 87 and readings[0].memory_used_bytes == 1024 * 2**20
    assert readings[1].util_percent == 0 and readings[1].memory_total_bytes == 81920 * 2**20
    assert parse_nvidia_smi("garbage\n") == {}
    assert NvidiaSmi(str(tmp_path / "missing")).read() == {}


FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *utilization.gpu*) printf '0, 87, 1024, 81920\\n1, 5, 0, 81920\\n' ;;
esac
"""


@pytest.mark.slow  # starts its own server/agent process
def test_gpu_readings_of_the_jobs_own_gpus(tmp_path: Path) -> None:
    """An agent whose PATH has an `nvidia-smi` reporting two GPUs: a job given GPU 0 reads GPU 0 only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    saved = {k: os.environ.get(k) for k in ("PATH", "DSTACK_AGENT_METRICS_INTERVAL")}
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    os.environ["DSTACK_AGENT_METRICS_INTERVAL"] = "0.5"
    try:
        info = start_agent(tmp_path / "home", TOKEN)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
            job_id = f"g-{uuid.uuid4().hex[:10]}"
            body = {"job_id": job_id, "run_name": "gpu", "commands": ["sleep 30"], "gpus": [0]}
            assert http.post("/api/jobs", json=body).status_code == 200
            assert http.post(f"/api/jobs/{job_id}/start").status_code == 200
            samples = _samples(http, job_id, 2)
            assert samples[-1]["gpus"] == [
                {
                    "index": 0,
                    "util_percent": 87.0,
                    "memory_used_bytes": 1024 * 2**20,
                    "memory_total_bytes": 81920 * 2**20,
                }
            ]
            http.post(f"/api/jobs/{job_id}/stop", json={"abort": True})
    finally:
        _stop_agent(info)
