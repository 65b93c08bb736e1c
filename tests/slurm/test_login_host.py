"""Slurm's commands on a login host over SSH (`login:` in config.yml): an sshd on loopback whose
sessions see the test cluster (`SetEnv SLURM_CONF`); offers and a job's agent through it, and an
unknown host key refused."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from dstack.core.models.resources import ResourcesSpec
from dstack.server.backends.slurm.backend import SlurmBackend
from dstack.server.backends.slurm.commands import SlurmCommandError
from dstack.server.backends.slurm.config import SlurmBackendConfig, SlurmLogin
from tests.slurm.cluster import PARTITION, SlurmCluster
from tests.util import free_port, wait_until

SSHD = "/usr/sbin/sshd"


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
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
async def remote(login_host: tuple[int, Path, Path], tmp_path: Path) -> AsyncIterator[SlurmBackend]:
    port, key, known = login_host
    login = SlurmLogin(hostname="127.0.0.1", user="root", port=port, identity_file=str(key), known_hosts=str(known))
    b = SlurmBackend(SlurmBackendConfig(login=login, shared_dir=str(tmp_path / "shared")), tmp_path)
    yield b
    await b.shutdown()


async def test_offers_and_agent_through_the_login_host(remote: SlurmBackend, slurm_cluster: SlurmCluster) -> None:
    offers = await remote.offers()
    assert {(o.backend, o.region) for o in offers} == {("slurm", PARTITION)} and len(offers) == 2
    sub = await remote.submit("dstack-login-0", ResourcesSpec.model_validate({"cpu": 1, "memory": "1GB"}))
    endpoint, node = await remote.agent(sub)
    assert node in {"sn1", "sn2"} and endpoint.token
    await remote.cancel(sub.job_id, grace=5)
    st = await remote.state(sub.job_id)
    assert st is not None and st.final


async def test_unknown_host_key_is_refused(login_host: tuple[int, Path, Path], tmp_path: Path) -> None:
    port, key, _ = login_host
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    login = SlurmLogin(hostname="127.0.0.1", user="root", port=port, identity_file=str(key), known_hosts=str(empty))
    b = SlurmBackend(SlurmBackendConfig(login=login, shared_dir=str(tmp_path / "shared")), tmp_path)
    with pytest.raises(SlurmCommandError, match="cannot reach the Slurm login host root@127.0.0.1: .*not trusted"):
        await b.offers()
    await b.shutdown()
