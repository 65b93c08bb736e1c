"""Services on Slurm: a replica is a long-lived Slurm job the proxy reaches on its compute node,
directly or (with `login:` in config.yml) through a local forward of the login host's SSH
connection."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from dstack.api import Resources, RunStatus, Service
from tests.conftest import ServerProcess
from tests.e2e.util import wait_ready
from tests.slurm.cluster import SlurmCluster

APPS = Path(__file__).resolve().parents[1] / "e2e" / "apps"
SMALL = Resources(cpu=1, memory="1GB", disk="1GB..")


def _serve_and_stop(srv: ServerProcess, cluster: SlurmCluster, run_name: str) -> None:
    client = srv.client()
    service = Service(commands=["python3 upstream.py plain 8000"], port=8000, backends=["slurm"], resources=SMALL)
    run = client.runs.submit(service, run_name=run_name, repo_dir=APPS)
    url = run.service_url.rstrip("/")
    try:
        try:
            r = wait_ready(url + "/hello?x=1", srv.headers, timeout=120)
        except AssertionError as e:
            run.refresh()
            raise AssertionError(f"{e}; run {run.status} {run.error}; {srv.logs()}") from None
        assert r.json()["path"] == "/hello", r.text
        run.refresh()
        assert run.status == RunStatus.RUNNING
        jpd = run.jobs[0].job_submissions[-1].job_provisioning_data
        assert jpd.backend == "slurm" and jpd.hostname in {n.name for n in cluster.nodes}
        name = f"dstack-{run.jobs[0].job_submissions[-1].id}"
        (slurm_id,) = cluster.cli("squeue", "-h", "-n", name, "-o", "%i").stdout.split()
        assert cluster.job_field(slurm_id, "JobState") == "RUNNING"
        assert httpx.get(url + "/again", headers=srv.headers, timeout=10).json()["path"] == "/again"
    finally:
        run.stop()
    deadline = time.time() + 60  # the stopped replica's allocation is released
    while time.time() < deadline and cluster.job_field(slurm_id, "JobState") == "RUNNING":
        time.sleep(0.5)
    assert cluster.job_field(slurm_id, "JobState") in ("COMPLETED", "CANCELLED")


def test_service_replica_on_a_compute_node(slurm_server: ServerProcess, slurm_cluster: SlurmCluster) -> None:
    _serve_and_stop(slurm_server, slurm_cluster, "slurm-svc")
    assert "reached through the login host" not in slurm_server.logs(100_000)


def test_service_through_the_login_host(login_server: ServerProcess, slurm_cluster: SlurmCluster) -> None:
    _serve_and_stop(login_server, slurm_cluster, "slurm-svc-login")
    assert "reached through the login host (127.0.0.1:" in login_server.logs(100_000)
