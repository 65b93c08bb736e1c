"""The test harness itself: each namespaced host is its own machine as far as SSH can tell."""

import subprocess

import pytest

pytestmark = pytest.mark.slow


def _ssh(net, host, command: str) -> str:
    r = subprocess.run(
        [
            "ssh", "-i", str(net.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"root@{host.address}", command,
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_hosts_are_separate(host_net):
    names = set()
    for host in host_net.hosts[:3]:
        assert _ssh(host_net, host, "hostname").strip() == host.name
        names.add(host.name)
        # a private home: a file written on one host is absent on the others
        _ssh(host_net, host, f"echo {host.name} > ~/whoami")
    assert len(names) == 3
    for host in host_net.hosts[:3]:
        assert _ssh(host_net, host, "cat ~/whoami").strip() == host.name
        assert host.address in _ssh(host_net, host, "ip -4 -o addr show eth0")
