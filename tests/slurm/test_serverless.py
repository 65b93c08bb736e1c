"""A serverless worker on Slurm: an unmodified runpod handler (runpod==1.12.0 from the local
wheelhouse, tests/wheelhouse.py) runs as a long-lived Slurm job and reaches
the server's /v2 at config.yml's `server_url` (the server's address on the cluster's network: the
URL the server gives its jobs is its loopback, which a compute node does not reach), and answers
`runsync`."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dstack.api import Resources, Serverless
from tests.conftest import TEST_SERVER_ENV, ServerProcess, make_server
from tests.slurm.cluster import SlurmCluster
from tests.util import wait_until
from tests.wheelhouse import RUNPOD, runpod_wheelhouse

HANDLER = """
import socket
import runpod


def handler(job):
    return {"host": socket.gethostname(), "value": job["input"].get("value")}


runpod.serverless.start({"handler": handler})
"""


class AllAddressesServer(ServerProcess):
    """A server listening on every address (the nodes call it on the cluster's bridge)."""

    def start(self) -> None:
        log = open(self.home / f"server-{int(time.time() * 1000)}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dstack.cli.main", "server", "--host", "0.0.0.0", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._answers, timeout=120, interval=0.1, what="the server to answer")


@pytest.fixture
def sls_server(slurm_cluster: SlurmCluster, tmp_path: Path) -> Iterator[ServerProcess]:
    runpod_wheelhouse()  # downloaded before the server starts (skips, saying why, without PyPI)
    base = make_server(tmp_path, **TEST_SERVER_ENV, SLURM_CONF=str(slurm_cluster.conf))
    srv = AllAddressesServer(base.home, base.port, base.token, base.database_url, base.extra_env)
    slurm_cluster.write_server_config(
        srv.home, tmp_path / "shared", server_url=f"http://{slurm_cluster.gateway}:{srv.port}"
    )
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.kill_agents()
        slurm_cluster.cancel_all()


def test_runsync_served_by_a_worker_on_slurm(
    sls_server: ServerProcess, slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "handler.py").write_text(HANDLER)
    client = sls_server.client()
    sls = Serverless(
        setup=[f"pip install -q --no-index --find-links {runpod_wheelhouse()} {RUNPOD}"],
        commands=["python handler.py"],
        resources=Resources(cpu=1, memory="1GB", disk="1GB.."),
        workers="1..1",
        backends=["slurm"],
    )
    run = client.runs.submit(sls, run_name="slurm-sls", repo_dir=repo)
    try:

        def ready() -> bool:
            h = httpx.get(f"{run.endpoint_url}/health", headers=sls_server.headers, timeout=10)
            w = h.json().get("workers", {}) if h.status_code == 200 else {}
            return w.get("idle", 0) + w.get("running", 0) == 1

        wait_until(ready, timeout=420, interval=1, what="the worker on Slurm to poll the server")
        r = httpx.post(
            f"{run.endpoint_url}/runsync", headers=sls_server.headers, json={"input": {"value": "hi"}}, timeout=600
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "COMPLETED", (body, sls_server.logs())
        assert body["output"] == {"host": body["output"]["host"], "value": "hi"}
        assert body["output"]["host"] in {n.name for n in slurm_cluster.nodes}  # answered on a compute node
        run.refresh()
        jpd = run.jobs[0].job_submissions[-1].job_provisioning_data
        assert jpd is not None and jpd.backend == "slurm"
    finally:
        run.stop(abort=True)
