"""Fixtures for SSH fleet tests: namespaced hosts with their own sshd (see hosts.py)."""

from collections.abc import Iterator

import pytest

from tests.fleets.hosts import HostNetwork, HostsUnavailable, check_available


@pytest.fixture(scope="session")
def host_net(tmp_path_factory) -> Iterator[HostNetwork]:
    """A bridge with 3 hosts for the session; tests may add more with `add_hosts`."""
    try:
        check_available()
    except HostsUnavailable as e:
        pytest.skip(str(e))
    net = HostNetwork(tmp_path_factory.mktemp("hosts"))
    try:
        net.add_hosts(3)
        yield net
    finally:
        net.close()
