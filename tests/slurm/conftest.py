"""Fixtures for the Slurm backend's tests: a real two-node cluster (see cluster.py)."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_SERVER_ENV, ServerProcess, make_server
from tests.slurm.cluster import PARTITION, ClusterUnavailable, SlurmCluster, check_available


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


@pytest.fixture
def slurm_server(slurm_cluster: SlurmCluster, tmp_path: Path) -> Iterator[ServerProcess]:
    srv = make_server(tmp_path, **TEST_SERVER_ENV, SLURM_CONF=str(slurm_cluster.conf))
    (srv.home / "server").mkdir(parents=True, exist_ok=True)
    (srv.home / "server" / "config.yml").write_text(
        "projects:\n"
        "  - name: main\n"
        "    backends:\n"
        "      - type: slurm\n"
        f"        partitions: [{PARTITION}]\n"
        f"        shared_dir: {tmp_path / 'shared'}\n"
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.kill_agents()
        out = slurm_cluster.cli("squeue", "-h", "-o", "%i", check=False).stdout
        for job_id in out.split():
            slurm_cluster.cli("scancel", job_id, check=False)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that start a cluster (or a server on one) are in the slow tier."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
