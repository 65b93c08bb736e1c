"""Fixtures for the Slurm backend's tests: a real two-node cluster (see cluster.py)."""

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TEST_SERVER_ENV, ServerProcess, make_server
from tests.slurm.cluster import ClusterUnavailable, SlurmCluster, check_available
from tests.util import free_port, wait_until

SSHD = "/usr/sbin/sshd"


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
    yield from _server(slurm_cluster, tmp_path)


@pytest.fixture
def login_server(
    slurm_cluster: SlurmCluster, login_host: tuple[int, Path, Path], tmp_path: Path
) -> Iterator[ServerProcess]:
    """A server whose Slurm backend runs Slurm's commands on the `login_host` over SSH."""
    port, key, known = login_host
    login = f"{{hostname: 127.0.0.1, user: root, port: {port}, identity_file: {key}, known_hosts: {known}}}"
    yield from _server(slurm_cluster, tmp_path, login=login)


def _server(slurm_cluster: SlurmCluster, tmp_path: Path, login: str | None = None) -> Iterator[ServerProcess]:
    srv = make_server(tmp_path, **TEST_SERVER_ENV, SLURM_CONF=str(slurm_cluster.conf))
    settings = {"login": login} if login is not None else {}
    slurm_cluster.write_server_config(srv.home, tmp_path / "shared", **settings)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.kill_agents()
        slurm_cluster.cancel_all()


@pytest.fixture
def login_host(slurm_cluster: SlurmCluster, tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """(port, client key, known_hosts) of an sshd on 127.0.0.1."""
    if not Path(SSHD).exists() or shutil.which("ssh-keygen") is None:
        pytest.skip("a login host needs Debian's openssh-server and ssh-keygen")
    d = tmp_path / "login"
    d.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id")], check=True)
    (d / "authorized_keys").write_text((d / "id.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"UsePAM no\nStrictModes no\nSetEnv SLURM_CONF={slurm_cluster.conf}\nLogLevel ERROR\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.DEVNULL)
    known = d / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} " + " ".join((d / "host_key.pub").read_text().split()[:2]) + "\n")
    try:
        wait_until(lambda: _listening(port), timeout=20, interval=0.1, what="sshd")
        yield port, d / "id", known
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that start a cluster (or a server on one) are in the slow tier."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
