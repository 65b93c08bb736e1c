"""Slurm's commands on a login host over SSH (`login:` in config.yml): an sshd on loopback whose
sessions see the test cluster (`SetEnv SLURM_CONF`); offers and a job's agent through it, and an
unknown host key refused."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dstack.core.models.resources import ResourcesSpec
from dstack.server.backends.slurm.backend import SlurmBackend
from dstack.server.backends.slurm.commands import SlurmCommandError
from dstack.server.backends.slurm.config import SlurmBackendConfig, SlurmLogin
from tests.slurm.cluster import PARTITION, SlurmCluster


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
