"""Slurm's commands on a login host over SSH (`login:` in config.yml): an sshd on loopback whose
sessions see the test cluster (`SetEnv SLURM_CONF`); offers and a job's agent through it, a server
reaching a task's agent through a forward of that connection, and an unknown host key refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from dstack.api import Resources, Run, RunStatus, Task
from dstack.core.models.resources import ResourcesSpec
from dstack.server.backends.slurm.backend import SlurmBackend
from dstack.server.backends.slurm.commands import SlurmCommandError
from dstack.server.backends.slurm.config import SlurmBackendConfig, SlurmLogin
from tests.conftest import ServerProcess
from tests.multinode import ranks_script
from tests.slurm.cluster import PARTITION, SlurmCluster
from tests.util import wait_until


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


def _agent_url_of_instance(srv: ServerProcess, name: str) -> str:
    db = sqlite3.connect(srv.home / "server" / "data" / "sqlite.db")
    try:
        (agent,) = db.execute("SELECT agent FROM instances WHERE name = ?", (name,)).fetchone()
    finally:
        db.close()
    return str(json.loads(agent)["url"])


def _running_instance(run: Run) -> str | None:
    """The instance of the run's job once the run is RUNNING there, else None."""
    run.refresh()
    jpd = run.jobs[0].job_submissions[-1].job_provisioning_data
    return jpd.instance_name if run.status == RunStatus.RUNNING and jpd and jpd.instance_id else None


def _accepts(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as s:
        return s.connect_ex((parts.hostname or "", parts.port or 0)) == 0


def test_server_reaches_the_agent_through_the_login_host(
    login_server: ServerProcess, slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """With `login:` the server's requests to the job's agent go through a local forward of the
    login host's connection: the instance's agent URL is on loopback, not the node's address, the
    task's logs and status arrive through it, and the forward is closed once the job is over."""
    srv = login_server
    client = srv.client()
    task = Task(
        commands=["hostname", "sleep 2", "echo through-the-login-host"],
        backends=["slurm"],
        resources=Resources(cpu=1, memory="1GB", disk="1GB.."),
    )
    run = client.runs.submit(task, run_name="slurm-login-agent")
    output = b"".join(run.logs()).decode()
    run.refresh()
    assert run.status == RunStatus.DONE, (run.status, run.error, output, srv.logs())
    lines = output.splitlines()
    assert lines[0] in {"sn1", "sn2"} and "through-the-login-host" in lines, output
    jpd = run.jobs[0].job_submissions[-1].job_provisioning_data
    url = _agent_url_of_instance(srv, jpd.instance_name)
    assert urlsplit(url).hostname == "127.0.0.1", url
    agent_json = next((tmp_path / "shared" / "jobs").glob("dstack-*/home/agent.json"), None)
    if agent_json is not None:  # a loopback port of our own, not the agent's port on the node
        assert urlsplit(url).port != json.loads(agent_json.read_text())["port"]
    assert f"is reached through the login host at {url}" in srv.logs(100_000)
    wait_until(lambda: not _accepts(url), timeout=60, interval=0.5, what="the forward closed after the job")


def _drop_login_connections(login_dir: Path) -> int:
    """End the login host's per-connection sshd processes (by id): the server's SSH connection,
    and every forward over it, drops as when a login host restarts its sshd."""
    listener = int((login_dir / "sshd.pid").read_text())
    children = subprocess.run(["pgrep", "-P", str(listener)], capture_output=True, text=True).stdout.split()
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)
    return len(children)


def test_forward_to_the_agent_is_reopened_after_the_login_connection_drops(
    login_server: ServerProcess, slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    srv = login_server
    client = srv.client()
    task = Task(
        commands=["echo before-drop", "sleep 15", "echo after-drop"],
        backends=["slurm"],
        resources=Resources(cpu=1, memory="1GB", disk="1GB.."),
    )
    run = client.runs.submit(task, run_name="slurm-login-drop")

    name = wait_until(lambda: _running_instance(run), timeout=90, interval=0.5, what="the task running")
    first = _agent_url_of_instance(srv, name)
    assert urlsplit(first).hostname == "127.0.0.1", first
    assert _drop_login_connections(tmp_path / "login") > 0
    second = wait_until(
        lambda: (u := _agent_url_of_instance(srv, name)) != first and u,
        timeout=60,
        interval=0.5,
        what="a new forward",
    )
    assert urlsplit(second).hostname == "127.0.0.1", second
    output = b"".join(run.logs()).decode()
    run.refresh()
    assert run.status == RunStatus.DONE, (run.status, run.error, output, srv.logs())
    assert "before-drop" in output and "after-drop" in output, output
    assert "re-opened forward" in srv.logs(100_000)


def test_two_nodes_through_the_login_host_get_the_nodes_addresses(
    login_server: ServerProcess, slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """The agents are reached through forwards on loopback, yet the ranks' DSTACK_NODES_IPS are the
    nodes' addresses and rank 1 reaches rank 0 there over TCP."""
    srv = login_server
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "ranks.py").write_text(ranks_script(29479))
    task = Task(
        commands=["python3 ranks.py"],
        nodes=2,
        backends=["slurm"],
        resources=Resources(cpu=1, memory="1GB", disk="1GB.."),
    )
    run = srv.client().runs.submit(task, run_name="slurm-login-two-nodes", repo_dir=repo)
    output = b"".join(run.logs()).decode()
    run.refresh()
    assert run.status == RunStatus.DONE, (run.status, run.error, output, srv.logs())
    jobs = sorted(run.jobs, key=lambda j: j.job_spec.job_num)
    hosts = [j.job_submissions[-1].job_provisioning_data.hostname for j in jobs]
    by_name = {n.name: n.address for n in slurm_cluster.nodes}
    first = output.splitlines()[0]
    assert first == f"rank=0 host={hosts[0]} nodes=2 ips={by_name[hosts[0]]},{by_name[hosts[1]]}", output
    assert f"got: hello from {hosts[1]}" in output, output
    for j in jobs:
        url = _agent_url_of_instance(srv, j.job_submissions[-1].job_provisioning_data.instance_name)
        assert urlsplit(url).hostname == "127.0.0.1", url


def test_restarted_server_reattaches_through_a_new_forward(
    login_server: ServerProcess, slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """The stored agent URL is the killed server's forward (gone with it): the restarted server reads
    the agent's `agent.json` again and forwards anew; the task's every line arrives once."""
    srv = login_server
    task = Task(
        commands=["for i in $(seq 1 40); do echo tick-$i; sleep 0.25; done"],
        backends=["slurm"],
        resources=Resources(cpu=1, memory="1GB", disk="1GB.."),
    )
    run = srv.client().runs.submit(task, run_name="slurm-login-restart")

    name = wait_until(lambda: _running_instance(run), timeout=90, interval=0.3, what="the task running")
    first = _agent_url_of_instance(srv, name)
    srv.kill()  # SIGKILL: the Slurm job and its agent keep running; the forward is gone
    assert not _accepts(first)
    srv.start()
    run = srv.client().runs.get("slurm-login-restart")
    output = b"".join(run.logs()).decode()
    run.refresh()
    assert run.status == RunStatus.DONE, (run.status, run.error, output, srv.logs())
    ticks = [line for line in output.splitlines() if line.startswith("tick-")]
    assert ticks == [f"tick-{i}" for i in range(1, 41)], output
    assert f"re-attached to Slurm allocation {name}" in srv.logs(200_000)
    again = _agent_url_of_instance(srv, name)
    assert urlsplit(again).hostname == "127.0.0.1", again
