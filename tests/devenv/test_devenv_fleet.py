"""A dev environment on an SSH fleet host: `ssh RUN` goes client → server (WebSocket tunnel) → the
host's SSH connection → the job's SSH server, and lands on that host (its hostname) in the job's
environment. Hosts are network namespaces with their own sshd (tests/fleets/hosts.py)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dstack.core.models.fleets import FleetConfiguration
from tests.conftest import running_server
from tests.devenv.test_devenv import _popen, _ssh, _wait_ssh
from tests.fleets.hosts import HostNetwork, hosts_or_skip
from tests.util import wait_until

pytestmark = pytest.mark.slow
SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def host_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostNetwork]:
    """One namespaced host with its own sshd (tests/fleets/hosts.py), or a skip saying why not."""
    with hosts_or_skip(tmp_path_factory.mktemp("hosts"), 1) as net:
        yield net


def test_ssh_into_a_dev_environment_on_a_fleet_host(host_net: HostNetwork, tmp_path: Path) -> None:
    h0 = host_net.hosts[0]
    with running_server(tmp_path) as srv:
        client = srv.client()
        conf = FleetConfiguration.model_validate(
            {"type": "fleet", "name": "dev", "ssh_config": {"identity_file": str(host_net.key), "hosts": [h0.address]}}
        )
        client.fleets.apply(conf)
        deadline = time.time() + 180
        while not all(i.status == "idle" for i in client.fleets.get("dev").instances):
            assert time.time() < deadline, client.fleets.get("dev")
            time.sleep(0.5)

        user_home = tmp_path / "home"
        user_home.mkdir()
        env = dict(srv.env, HOME=str(user_home), DSTACK_HOME=str(user_home / ".dstack"), PYTHONPATH=SRC)
        subprocess.run(
            [sys.executable, "-m", "dstack.cli.main", "config", "--url", srv.url, "--project", "main"]
            + ["--token", srv.token],
            env=env,
            check=True,
            capture_output=True,
        )
        run = f"fdev-{uuid.uuid4().hex[:6]}"
        token = uuid.uuid4().hex
        repo = tmp_path / "repo"
        repo.mkdir()
        (repo / ".dstack.yml").write_text(
            f"type: dev-environment\nname: {run}\nfleets: [dev]\nenv:\n  FLEET_TOKEN: {token}\n"
            "resources:\n  cpu: 0..\n  memory: 0.1GB..\n  disk: 1GB..\n"
        )
        done = subprocess.run(
            [sys.executable, "-m", "dstack.cli.main", "apply", "-y", "-d", "-f", str(repo / ".dstack.yml")],
            env=env,
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        attach = None
        try:
            r = client.runs.get(run)
            deadline = time.time() + 180
            while r.refresh().status.value != "running":
                sub = r.jobs[0].job_submissions[-1] if r.jobs else None
                if r.status.is_finished() or time.time() > deadline:
                    logs = b"".join(r.logs(follow=False)).decode(errors="replace")[-2000:]
                    why = (sub.termination_reason, sub.termination_reason_message) if sub else None
                    raise AssertionError(f"{run} is {r.status.value}: {why}; logs: {logs}")
                time.sleep(0.5)
            attach = _popen(env, "attach", run, "--no-logs")
            config = user_home / ".dstack" / "ssh" / "config"
            wait_until(lambda: config.exists() and f"Host {run}" in config.read_text(), 60, 0.5, "the host entry")
            _wait_ssh(env, run)
            out = _ssh(env, run, "echo token=$FLEET_TOKEN; hostname")
            assert out.returncode == 0, out.stderr
            assert f"token={token}" in out.stdout.splitlines()
            assert h0.name in out.stdout.splitlines()  # on the fleet host, not the server's
        finally:
            if attach is not None:
                attach.terminate()
                attach.communicate(timeout=20)
            client.runs.get(run).stop(abort=True)
