"""Fixtures for SSH fleet tests: namespaced hosts with their own sshd (see hosts.py)."""

from collections.abc import Iterator

import pytest

from tests.fleets.hosts import HostNetwork, hosts_or_skip


@pytest.fixture(scope="session")
def host_net(tmp_path_factory) -> Iterator[HostNetwork]:
    """A bridge with 3 hosts for the session; tests may add more with `add_hosts`."""
    with hosts_or_skip(tmp_path_factory.mktemp("hosts"), 3) as net:
        yield net
