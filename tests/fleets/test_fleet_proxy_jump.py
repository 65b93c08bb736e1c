"""A fleet host reachable only through another host (`proxy_jump`): a namespace on a second bridge
this machine has no address on, whose only way in is the jump namespace's second link. The fleet
is applied (the host probed and its agent shipped through the jump), a task runs there and its
output comes back, and the proxy reaches a service replica there, all through the jump."""

import socket
import subprocess
from pathlib import Path

import httpx
import pytest

from dstack.api import Resources, RunStatus, Service, Task
from dstack.core.models.fleets import FleetConfiguration
from tests.conftest import running_server
from tests.e2e.util import wait_ready
from tests.fleets.hosts import hosts_or_skip
from tests.util import wait_for

pytestmark = pytest.mark.slow
APPS = Path(__file__).resolve().parents[1] / "e2e" / "apps"
SMALL = Resources(cpu="0..", memory="0.1GB..", disk="1GB..")


@pytest.fixture(scope="module")
def jump_net(tmp_path_factory):
    """A network of its own: a jump host on the bridge, and a private host behind it."""
    with hosts_or_skip(tmp_path_factory.mktemp("jump-hosts"), 1) as net:
        jump = net.hosts[0]
        private = net.add_private_host(jump)
        yield net, jump, private


def test_fleet_through_proxy_jump(jump_net, tmp_path):
    net, jump, private = jump_net
    # this machine cannot reach the private host (no route of its own: its default route may lead
    # to something that accepts any connection, but no SSH server answers); the jump host can
    assert (
        net.private is not None
        and net.private[0]
        not in subprocess.run(["ip", "route", "get", private.address], capture_output=True, text=True).stdout
    )
    assert _banner(private.address) != b"SSH-"
    assert jump.exec("bash", "-c", f"exec 3<>/dev/tcp/{private.address}/22 && head -c 4 <&3").stdout == "SSH-"

    with running_server(tmp_path) as srv:
        client = srv.client()
        key = str(net.key)
        conf = FleetConfiguration.model_validate(
            {
                "type": "fleet",
                "name": "behind",
                "ssh_config": {
                    "identity_file": key,
                    "proxy_jump": {"hostname": jump.address, "user": "root", "identity_file": key},
                    "hosts": [private.address],
                },
            }
        )
        client.fleets.apply(conf)
        # (an attach that runs out of time under load is retried every 10 s: wait for idle)
        inst = wait_for(lambda: client.fleets.get("behind").instances[0], lambda i: i.status == "idle", 300)
        assert inst.hostname == private.address

        # a task on the private host: its output (the host's own hostname) comes back
        run = client.runs.submit(
            Task(commands=["hostname", "echo via-jump-$DSTACK_RUN_NAME"], fleets=["behind"], resources=SMALL),
            run_name="jumped",
        )

        def status():
            run.refresh()
            return run.status

        assert wait_for(status, lambda s: s.is_finished(), 120) == RunStatus.DONE, run.error
        logs = b"".join(run.logs()).decode()
        assert private.name in logs.split() and "via-jump-jumped" in logs, logs
        assert run.jobs[0].job_submissions[-1].job_provisioning_data.hostname == private.address

        # a service replica there, reached by the proxy through the private host's SSH connection
        svc = client.runs.submit(
            Service(commands=["python3 upstream.py plain 8000"], port=8000, fleets=["behind"], resources=SMALL),
            run_name="jumped-svc",
            repo_dir=APPS,
        )
        try:
            wait_ready(svc.service_url, srv.headers, timeout=120)
            r = httpx.get(svc.service_url, headers=srv.headers, timeout=10)
            assert r.status_code == 200 and r.json()["replica"] == "0", r.text
        finally:
            svc.stop(abort=True)
        wait_for(lambda: client.fleets.get("behind").instances[0].jobs, lambda j: not j, 60)
        client.fleets.delete("behind")
        assert not [p for p in private.pids() if b"dstack.agent" in _cmdline(p)]  # its agent is stopped


def _banner(address: str) -> bytes:
    try:
        with socket.create_connection((address, 22), timeout=3) as sock:
            sock.settimeout(3)
            return sock.recv(4)
    except OSError:
        return b""


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
