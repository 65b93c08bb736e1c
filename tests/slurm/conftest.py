"""Fixtures for the Slurm backend's tests: a real two-node cluster (see cluster.py)."""

from collections.abc import Iterator

import pytest

from tests.slurm.cluster import ClusterUnavailable, SlurmCluster, check_available


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """Controller plus nodes sn1 (one fake GPU) and sn2, partition `debug`, for the session."""
    try:
        check_available()
    except ClusterUnavailable as e:
        pytest.skip(str(e))
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that start a cluster (or a server on one) are in the slow tier."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
