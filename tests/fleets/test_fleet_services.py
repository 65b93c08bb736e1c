"""A service with 2 replicas on 2 fleet hosts behind the proxy: each replica is reached through its
host's SSH connection (no port opens on the host), requests are balanced over both, and a
streamed response arrives chunk by chunk. A replica whose app is not listening yet gets no
traffic, though the forward's local port accepts connections."""

import time
from pathlib import Path

import httpx
import pytest

from dstack.api import Resources, RunStatus, Service
from dstack.core.models.fleets import FleetConfiguration
from tests.conftest import running_server
from tests.e2e.util import wait_ready
from tests.fleets.hosts import apply_fleet, wait_fleet_free

pytestmark = pytest.mark.slow
APPS = Path(__file__).resolve().parents[1] / "e2e" / "apps"
# all of a host's CPUs (2 here): the second replica must go to the other host
WHOLE_HOST = Resources(cpu="2..", memory="0.1GB..", disk="1GB..")


def test_service_replicas_on_two_hosts(host_net, tmp_path):
    h0, h1 = host_net.hosts[:2]
    with running_server(tmp_path) as srv:
        client = srv.client()
        conf = FleetConfiguration.model_validate(
            {
                "type": "fleet",
                "name": "svc",
                "ssh_config": {"identity_file": str(host_net.key), "hosts": [h0.address, h1.address]},
            }
        )
        client.fleets.apply(conf)
        deadline = time.time() + 180
        while not all(i.status == "idle" for i in client.fleets.get("svc").instances):
            assert time.time() < deadline, client.fleets.get("svc")
            time.sleep(0.5)
        if any(i.resources["cpus"] < 2 for i in client.fleets.get("svc").instances):
            pytest.skip("the hosts have fewer than 2 CPUs: one replica per host cannot be forced by resources")

        service = Service(
            commands=["python3 upstream.py plain 8000"], port=8000, replicas=2, fleets=["svc"], resources=WHOLE_HOST
        )
        run = client.runs.submit(service, run_name="remote-svc", repo_dir=APPS)
        try:
            wait_ready(run.service_url, srv.headers, timeout=120)
            seen: set[str] = set()
            deadline = time.time() + 60
            while seen != {"0", "1"} and time.time() < deadline:
                seen.add(httpx.get(run.service_url, headers=srv.headers, timeout=10).json()["replica"])
            assert seen == {"0", "1"}
            run.refresh()
            hosts = {j.job_submissions[-1].job_provisioning_data.hostname for j in run.jobs}
            assert hosts == {h0.address, h1.address}
            for h in (h0, h1):  # only sshd listens on the host's address
                listeners = h.exec("ss", "-ltnH").stdout
                assert not [line for line in listeners.splitlines() if h.address in line and ":22 " not in line]
        finally:
            run.stop(abort=True)

        wait_fleet_free(client, "svc")
        sse = Service(commands=["python3 upstream.py sse 8000"], port=8000, fleets=["svc"], resources=WHOLE_HOST)
        run = client.runs.submit(sse, run_name="remote-sse", repo_dir=APPS)
        try:
            wait_ready(run.service_url, srv.headers, path="stream?n=1&delay=0", timeout=120)
            t0 = time.time()
            arrivals = []
            url = run.service_url + "stream?n=4&delay=0.4"
            with httpx.stream("GET", url, headers=srv.headers, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        arrivals.append(time.time() - t0)
            assert len(arrivals) == 4
            assert arrivals[0] < 1.0 and arrivals[-1] - arrivals[0] > 0.8, arrivals  # not buffered
        finally:
            run.stop(abort=True)
        wait_fleet_free(client, "svc")
        client.fleets.delete("svc")


def test_replica_gets_traffic_only_once_its_app_listens(host_net, tmp_path):
    """The readiness check without probes must reach the app on the host, not stop at the local end
    of the SSH forward (which accepts at once): else the proxy routes to a replica whose app has
    not bound its port yet and answers 502."""
    h2 = host_net.hosts[2]
    with running_server(tmp_path) as srv:
        client = srv.client()
        apply_fleet(client, host_net, "late", [h2])
        service = Service(
            commands=["sleep 10", "python3 upstream.py plain 8000"],
            port=8000,
            fleets=["late"],
            resources=Resources(cpu="0..", memory="0.1GB..", disk="1GB.."),
        )
        run = client.runs.submit(service, run_name="late-app", repo_dir=APPS)
        try:
            deadline = time.time() + 60
            while run.status != RunStatus.RUNNING:
                assert time.time() < deadline, (run.status, run.error)
                time.sleep(0.2)
                run.refresh()
            answers: list[tuple[int, str]] = []
            deadline = time.time() + 60
            while not answers or answers[-1][0] != 200:
                assert time.time() < deadline, answers[-5:]
                r = httpx.get(run.service_url, headers=srv.headers, timeout=10)
                answers.append((r.status_code, r.text))
                time.sleep(0.2)
            assert [a for a in answers if a[0] != 503 and a[0] != 200] == [], answers
            assert any(code == 503 and "no ready replica" in text for code, text in answers), answers
            assert answers[-1][1] and httpx.get(run.service_url, headers=srv.headers).json()["replica"] == "0"
        finally:
            run.stop(abort=True)
        wait_fleet_free(client, "late")
        client.fleets.delete("late")
