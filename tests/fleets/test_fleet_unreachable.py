"""A fleet host whose link goes down turns `unreachable` (with the reason) within about 30 s, and
is re-attached to the same agent when the link comes back."""

import json
import subprocess
import time

import pytest

from dstack.core.models.fleets import FleetConfiguration
from tests.conftest import running_server

pytestmark = pytest.mark.slow


def _status(client, name: str):
    return client.fleets.get(name).instances[0]


def _wait(client, name: str, status: str, timeout: float):
    deadline = time.monotonic() + timeout
    inst = None
    while time.monotonic() < deadline:
        inst = _status(client, name)
        if inst.status == status:
            return inst
        time.sleep(0.5)
    raise AssertionError(f"not {status} within {timeout:g} s: {inst}")


def _agent_pid(net, host) -> int:
    r = subprocess.run(
        ["ssh", "-i", str(net.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"root@{host.address}", "cat ~/.dstack/agent/home/agent.json"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return int(json.loads(r.stdout)["pid"])


def test_host_link_down_then_up(host_net, tmp_path):
    host = host_net.hosts[1]
    with running_server(tmp_path) as srv:
        client = srv.client()
        conf = FleetConfiguration.model_validate(
            {
                "type": "fleet",
                "name": "flaky",
                "ssh_config": {"identity_file": str(host_net.key), "hosts": [host.address]},
            }
        )
        client.fleets.apply(conf)
        _wait(client, "flaky", "idle", 180)
        pid = _agent_pid(host_net, host)
        try:
            host_net.link_down(host)
            started = time.monotonic()
            inst = _wait(client, "flaky", "unreachable", 45)
            assert time.monotonic() - started <= 45
            assert inst.status_message, inst
        finally:
            host_net.link_up(host)
        _wait(client, "flaky", "idle", 90)
        assert _agent_pid(host_net, host) == pid  # the same agent, re-attached
        client.fleets.delete("flaky")
