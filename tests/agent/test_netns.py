"""Per-job network namespaces ("network": "isolated"): a real agent process, real namespaces."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from dstack.agent.launcher import start_agent
from tests.agent.test_agent import TOKEN, _stop_agent, make_tar, pull, submit, text, wait_final, wait_gone
from tests.util import wait_until


def _get_or_none(url: str) -> httpx.Response | None:
    """The answer, or None while nothing listens there."""
    try:
        return httpx.get(url, timeout=2)
    except httpx.TransportError:
        return None


def _cannot_isolate() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "not root: this machine cannot create network namespaces for jobs"
    ip = shutil.which("ip") or "/usr/sbin/ip"
    name = f"dstack-testprobe-{os.getpid()}"
    try:
        out = subprocess.run([ip, "netns", "add", name], capture_output=True, text=True, timeout=10)
    except OSError as e:
        return f"`ip` (iproute2) is not usable: {e}"
    if out.returncode != 0:
        return f"cannot create network namespaces here: {out.stderr.strip()}"
    subprocess.run([ip, "netns", "del", name], capture_output=True)
    return None


_WHY_NOT = _cannot_isolate()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


def netns_list() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def wait_running(client: httpx.Client, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = pull(client, job_id, known_state="preparing", wait=2)
        if resp["state"] == "running":
            return resp
        assert resp["state"] in ("submitted", "preparing"), resp
    raise AssertionError(f"job {job_id} did not start")


def job_netns(home: Path, job_id: str) -> dict[str, Any]:
    state = json.loads((home / "jobs" / job_id / "state.json").read_text())
    assert state["netns"], state
    return state["netns"]


def test_host_reports_isolation(client: httpx.Client) -> None:
    assert client.get("/api/host").json()["network_isolation"] is True


def test_host_network_job_reports_loopback(client: httpx.Client) -> None:
    job_id = submit(client, ["true"])
    resp, _ = wait_final(client, job_id)
    assert resp["state"] == "done"
    assert resp["network"] == "host" and resp["address"] == "127.0.0.1"
    entry = next(j for j in client.get("/api/jobs").json() if j["job_id"] == job_id)
    assert entry["network"] == "host" and entry["address"] == "127.0.0.1"


def test_two_isolated_servers_on_the_same_port(client: httpx.Client, home: Path) -> None:
    jobs = {}
    for name in ("alpha", "beta"):
        code = make_tar({"index.html": f"hello from {name}\n".encode()})
        job_id = submit(client, ["python -m http.server 8000 --bind 0.0.0.0"], code=code, network="isolated")
        jobs[name] = job_id
    try:
        addresses = {}
        for name, job_id in jobs.items():
            resp = wait_running(client, job_id)
            assert resp["network"] == "isolated"
            addresses[name] = resp["address"]
            assert addresses[name].startswith("10.213.")
            entry = next(j for j in client.get("/api/jobs").json() if j["job_id"] == job_id)
            assert entry == {"job_id": job_id, "state": "running", "network": "isolated", "address": addresses[name]}
            assert job_netns(home, job_id)["netns"] in netns_list()
        assert addresses["alpha"] != addresses["beta"]
        for name, address in addresses.items():
            r = wait_until(
                lambda address=address: _get_or_none(f"http://{address}:8000/index.html"),
                20,
                0.1,
                f"{name}: something listening on {address}:8000",
            )
            assert r.status_code == 200 and r.text == f"hello from {name}\n"
        # Both still running: neither failed with "address already in use".
        assert all(pull(client, j)["state"] == "running" for j in jobs.values())
    finally:
        for job_id in jobs.values():
            client.post(f"/api/jobs/{job_id}/stop", json={"abort": True})
    for job_id in jobs.values():
        resp, records = wait_final(client, job_id)
        assert resp["state"] == "aborted", text(records, None)


def test_isolated_job_stop_removes_namespace(client: httpx.Client, home: Path) -> None:
    job_id = submit(client, ["echo started", "ip -4 -o addr show", "sleep 30"], network="isolated")
    records: list[dict[str, Any]] = []
    while "started" not in text(records):
        records += pull(client, job_id, cursor=len(records), wait=5)["logs"]
    ns = job_netns(home, job_id)
    assert ns["netns"] in netns_list() and link_exists(ns["host_if"])
    pid = json.loads((home / "jobs" / job_id / "state.json").read_text())["pid"]
    assert psutil.Process(pid).cmdline()[0] == "bash"  # `ip netns exec` exec'd it: same pid and group
    assert os.getpgid(pid) == pid
    t0 = time.monotonic()
    assert client.post(f"/api/jobs/{job_id}/stop", json={"abort": False}).status_code == 200
    resp, more = wait_final(client, job_id)
    assert resp["state"] == "terminated" and time.monotonic() - t0 < 5
    out = text(records + more)
    assert f"inet {ns['address']}/30" in out and "127.0.0.1" in out  # its own veth + loopback, nothing else
    assert "eth0" not in out
    # The end is reported first; the namespace goes right after (its removal must not hold up the news).
    wait_until(
        lambda: ns["netns"] not in netns_list() and not link_exists(ns["host_if"]), 10, 0.05, "the namespace to go"
    )
    wait_until(
        lambda: json.loads((home / "jobs" / job_id / "state.json").read_text())["netns"] is None,
        5,
        0.05,
        "state.json to drop the namespace",
    )
    assert resp["address"] == ns["address"]


def test_delete_running_isolated_job(client: httpx.Client, home: Path) -> None:
    job_id = submit(client, ["echo x", "sleep 30"], network="isolated")
    while not pull(client, job_id, wait=5)["logs"]:
        pass
    ns = job_netns(home, job_id)
    assert client.delete(f"/api/jobs/{job_id}").status_code == 200
    assert ns["netns"] not in netns_list() and not link_exists(ns["host_if"])


def test_restart_cleans_up_namespaces(tmp_path: Path) -> None:
    home = tmp_path / "home"
    info = start_agent(home, TOKEN)
    try:
        with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            job_id = submit(c, ["echo started", "sleep 60"], network="isolated")
            while not pull(c, job_id, wait=5)["logs"]:
                pass
            ns = job_netns(home, job_id)
        os.kill(info.pid, signal.SIGKILL)
        wait_gone(info.pid)
        assert ns["netns"] in netns_list()  # left behind by the killed agent
        info = start_agent(home, TOKEN)
        with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            assert pull(c, job_id)["state"] == "failed"
        assert ns["netns"] not in netns_list() and not link_exists(ns["host_if"])
    finally:
        _stop_agent(info)


def test_isolated_falls_back_to_host_when_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSTACK_AGENT_NO_NETNS", "1")
    info = start_agent(tmp_path / "home", TOKEN)
    try:
        with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            assert c.get("/api/host").json()["network_isolation"] is False
            job_id = submit(c, ["true"], network="isolated")
            resp, records = wait_final(c, job_id)
            assert resp["state"] == "done", text(records, None)
            assert resp["network"] == "host" and resp["address"] == "127.0.0.1"
            assert json.loads((tmp_path / "home" / "jobs" / job_id / "state.json").read_text())["netns"] is None
    finally:
        _stop_agent(info)
