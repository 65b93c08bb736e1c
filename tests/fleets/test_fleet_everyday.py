"""Everyday features on SSH fleet hosts, as on the local backend: a project secret reaches a job on
a fleet host and no plain copy of it is anywhere else (API answers, logs, the host's agent files);
a busy job's CPU samples come back from the host's agent through the metrics API and the CLI;
dstack's official client attaches to a task on a fleet host and forwards its port.

Hosts are network namespaces with their own sshd and private /root (tests/fleets/hosts.py); one
server and one 2-host fleet serve the whole module.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets as pysecrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from dstack.core.models.fleets import FleetConfiguration
from tests.compat.official import OFFICIAL_VERSION, OfficialClient, official_venv
from tests.conftest import SRC, ServerProcess, running_server
from tests.fleets.hosts import Host, HostNetwork, hosts_or_skip
from tests.util import free_port, wait_until

pytestmark = pytest.mark.slow
FLEET = "everyday"
SMALL = {"cpu": "0..", "memory": "0.1GB..", "disk": "1GB.."}  # the hosts' homes are small tmpfs
HOSTNAMES = {"h0", "h1"}


@pytest.fixture(scope="module")
def host_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostNetwork]:
    with hosts_or_skip(tmp_path_factory.mktemp("hosts"), 2) as net:
        yield net


@pytest.fixture(scope="module")
def srv(host_net: HostNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server (SSH entry on, its default) with fleet `everyday` of two idle hosts."""
    with running_server(tmp_path_factory.mktemp("server"), DSTACK_SERVER_METRICS_INTERVAL="1") as server:
        conf = FleetConfiguration.model_validate(
            {
                "type": "fleet",
                "name": FLEET,
                "ssh_config": {"identity_file": str(host_net.key), "hosts": [h.address for h in host_net.hosts]},
            }
        )
        server.client().fleets.apply(conf)
        deadline = time.monotonic() + 180
        while True:
            instances = server.client().fleets.get(FLEET).instances
            if all(i.status == "idle" for i in instances):
                break
            assert not any(i.status == "unreachable" for i in instances), instances
            assert time.monotonic() < deadline, f"fleet {FLEET} not idle: {instances}"
            time.sleep(0.5)
        yield server


def _api(srv: ServerProcess, path: str, body: Any = None) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json=body if body is not None else {}, headers=srv.headers, timeout=60)


def _status(srv: ServerProcess, run_name: str) -> dict[str, Any]:
    r = _api(srv, "/api/project/main/runs/get", {"run_name": run_name})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _logs(srv: ServerProcess, run_name: str) -> tuple[str, str]:
    """The logs API's raw answer and the text it carries."""
    r = _api(srv, "/api/project/main/logs/poll", {"run_name": run_name, "limit": 1000})
    assert r.status_code == 200, r.text
    return r.text, b"".join(base64.b64decode(e["message"]) for e in r.json()["logs"]).decode(errors="replace")


def _wait_output(srv: ServerProcess, run_name: str, marker: str, timeout: float = 180) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        raw, out = _logs(srv, run_name)
        if marker in out:
            return raw, out
        run = _status(srv, run_name)
        assert run["status"] not in ("done", "failed", "terminated"), (run["status"], out[-2000:])
        assert time.monotonic() < deadline, f"{run_name} printed no {marker!r}: {out[-2000:]}"
        time.sleep(0.5)


def _stop(srv: ServerProcess, run_name: str) -> str:
    """Abort the run and wait until it is over (the next test wants the hosts); the stop's answer."""
    r = _api(srv, "/api/project/main/runs/stop", {"runs_names": [run_name], "abort": True})
    wait_until(
        lambda: _status(srv, run_name)["status"] in ("done", "failed", "terminated"), 90, 0.5, f"{run_name} stopped"
    )
    return r.text


def _host_root(host: Host) -> Path:
    """The host's own `/root` (a private tmpfs in its mount namespace), seen from here."""
    assert host.sshd is not None
    return Path(f"/proc/{host.sshd.pid}/root/root")


def _files_holding(root: Path, needles: list[bytes]) -> tuple[int, list[str]]:
    """How many files were read under `root`, and those holding any of `needles`."""
    seen, found = 0, []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                seen += 1
                data = path.read_bytes()
                if any(n in data for n in needles):
                    found.append(str(path))
        except OSError:
            continue
    return seen, found


def _cli(srv: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(srv.env)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_secret_reaches_a_job_on_a_fleet_host_and_nothing_else(srv: ServerProcess, host_net: HostNetwork) -> None:
    value = "fleet-s3cr3t-" + pysecrets.token_hex(16)
    needles = [value.encode(), base64.b64encode(value.encode())]
    digest = hashlib.sha256(value.encode()).hexdigest()
    answers = [_api(srv, "/api/project/main/secrets/create_or_update", {"name": "fleet_tok", "value": value}).text]
    run_name = f"fsec-{uuid.uuid4().hex[:6]}"
    conf = {
        "type": "task",
        "name": run_name,
        "fleets": [FLEET],
        "env": ["MY_SECRET=${{ secrets.fleet_tok }}"],
        "commands": [
            "hostname",
            "python3 -c \"import hashlib, os; print('sha', hashlib.sha256(os.environ['MY_SECRET'].encode()).hexdigest())\"",
            "echo ready",
            "sleep 300",
        ],
        "resources": SMALL,
    }
    r = _api(srv, "/api/project/main/runs/submit", {"run_spec": {"configuration": conf}})
    assert r.status_code == 200, r.text
    answers.append(r.text)
    try:
        raw, out = _wait_output(srv, run_name, "ready")
        answers.append(raw)
        assert f"sha {digest}" in out.splitlines(), out  # the job on the host has the value
        assert out.splitlines()[0] in HOSTNAMES, out  # ... and ran on a fleet host
        run = _status(srv, run_name)
        assert run["jobs"][0]["job_submissions"][-1]["job_provisioning_data"]["backend"] == "ssh", run
        answers += [_api(srv, "/api/project/main/runs/get", {"run_name": run_name}).text]
        answers += [_api(srv, "/api/project/main/runs/list", {}).text]
        answers += [_api(srv, "/api/project/main/secrets/list").text]
        # While it runs, its files are on that host's agent (its data dir in the host's own /root).
        host = next(h for h in host_net.hosts if h.name == out.splitlines()[0])
        agent_dir = _host_root(host) / ".dstack" / "agent"
        assert list(agent_dir.rglob("job.sh")), f"no job files under {agent_dir}"
        seen, leaks = _files_holding(agent_dir, needles)
        assert seen > 0 and not leaks, (seen, leaks)
        assert _files_holding(agent_dir, [run_name.encode()])[1], "the search reads the job's files"
        assert not _files_holding(srv.home, needles)[1]
    finally:
        answers.append(_stop(srv, run_name))
    for answer in answers:
        assert value not in answer
    for host in host_net.hosts:  # and after the job ended (its log file written out)
        assert not _files_holding(_host_root(host) / ".dstack", needles)[1], host.name


BUSY = (
    "python3 -c 'import time\n"
    "end = time.time() + 120\n"
    "mark = 0\n"
    "while time.time() < end:\n"
    "    if time.time() > mark:\n"
    '        print("cpu", time.time(), time.process_time(), flush=True)\n'
    "        mark = time.time() + 0.5'"
)


def _metrics(srv: ServerProcess, run_name: str) -> dict[str, Any]:
    r = httpx.get(
        f"{srv.url}/api/project/main/metrics/job/{run_name}", params={"limit": 100}, headers=srv.headers, timeout=30
    )
    assert r.status_code == 200, r.text
    return {m["name"]: m for m in r.json()["metrics"]}


def test_busy_job_on_a_fleet_host_shows_its_cpu(srv: ServerProcess) -> None:
    run_name = f"fbusy-{uuid.uuid4().hex[:6]}"
    conf = {"type": "task", "name": run_name, "fleets": [FLEET], "commands": ["hostname", BUSY], "resources": SMALL}
    r = _api(srv, "/api/project/main/runs/submit", {"run_spec": {"configuration": conf}})
    assert r.status_code == 200, r.text
    try:
        _, out = _wait_output(srv, run_name, "cpu ")
        assert out.splitlines()[0] in HOSTNAMES, out
        series: dict[str, Any] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            series = _metrics(srv, run_name)
            if len(series.get("cpu_usage_percent", {}).get("values", [])) >= 8:
                break
            assert _status(srv, run_name)["status"] == "running", _status(srv, run_name)["status"]
            time.sleep(1)
        cpu = series.get("cpu_usage_percent", {"values": []})
        assert len(cpu["values"]) >= 8, series
        assert series["memory_usage_bytes"]["values"][0] > 1_000_000

        # What the job measured itself over the samples' stretch of time (this machine is loaded:
        # compare with that, not with a full core).
        stamps = [datetime.fromisoformat(t).timestamp() for t in cpu["timestamps"]][:-1]  # skip the oldest
        _, out = _logs(srv, run_name)
        parts = [line.split() for line in out.splitlines()]
        lines = [(float(p[1]), float(p[2])) for p in parts if len(p) == 3 and p[0] == "cpu"]
        lines = [(t, c) for t, c in lines if min(stamps) <= t <= max(stamps)]
        assert len(lines) >= 3, lines
        job_percent = (lines[-1][1] - lines[0][1]) / (lines[-1][0] - lines[0][0]) * 100
        reported = sum(cpu["values"][:-1]) / len(cpu["values"][:-1])
        assert job_percent > 5, job_percent  # it was busy
        assert abs(reported - job_percent) <= max(12.0, 0.25 * job_percent), (reported, job_percent)

        shown_cli = _cli(srv, "metrics", run_name)
        assert shown_cli.returncode == 0, shown_cli.stderr
        row = next(ln for ln in shown_cli.stdout.splitlines() if ln.startswith("replica=0 job=0"))
        assert "running" in row, shown_cli.stdout
        shown = float(row.split()[3].rstrip("%"))
        assert 0 < shown <= 150, row
    finally:
        _stop(srv, run_name)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs OpenSSH's client (Debian: openssh-client)")
def test_official_client_attaches_to_a_task_on_a_fleet_host(srv: ServerProcess, tmp_path: Path) -> None:
    try:
        venv = official_venv()
    except RuntimeError as e:  # PyPI unreachable and nothing cached: say so, do not pass
        pytest.skip(f"dstack=={OFFICIAL_VERSION} could not be installed from PyPI: {e}")
    # a short home: OpenSSH refuses a ControlPath (`~/.dstack/ssh/RUN.control.sock`) of 108 bytes or more
    with tempfile.TemporaryDirectory(prefix="dsoc", dir="/tmp") as home:
        _attach_and_get(OfficialClient(venv, Path(home)), srv, tmp_path)


def _attach_and_get(official: OfficialClient, srv: ServerProcess, tmp_path: Path) -> None:
    from tests.compat.test_official_attach import Output, _forwarded, _get, _http_once

    official.cli("project", "add", "--name", "main", "--url", srv.url, "--token", srv.token, "-y")
    job_port, local_port = free_port(), free_port()
    name = f"fattach-{uuid.uuid4().hex[:6]}"
    task = tmp_path / "task.dstack.yml"
    task.write_text(
        f'type: task\nname: {name}\nfleets: [{FLEET}]\nports: ["{local_port}:{job_port}"]\n'
        "resources:\n  cpu: 0..\n  memory: 0.1GB..\n  disk: 1GB..\ncommands:\n"
        "  - hostname\n"
        f"  - |\n{textwrap.indent(_http_once(job_port, 'hello from the fleet host'), '    ')}\n"
        "  - sleep 600\n"
    )
    official.cli("apply", "-f", str(task), "-y", "-d", cwd=tmp_path)
    try:
        _, out_logs = _wait_output(srv, name, "\n")
        assert out_logs.splitlines()[0] in HOSTNAMES, out_logs
        wait_until(lambda: _status(srv, name)["status"] == "running", 120, 0.5, f"{name} running")
        out = Output(official.start("attach", "--logs", name))
        try:
            out.wait_for("Attached to run")
            assert _forwarded(local_port, out, 120) == "hello from the fleet host"
            out.wait_for("served")
            assert out.interrupt() == 0
        finally:
            out.close()
        assert _get(local_port) is None  # detached: the forward is gone
    finally:
        _stop(srv, name)
