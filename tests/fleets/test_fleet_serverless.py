"""Serverless workers on fleet hosts: an unmodified runpod handler (runpod==1.12.0, installed on the
host from a local wheelhouse: hosts have no internet) reaches the server's `/v2` worker API through
the reverse forward its host's SSH connection carries, and answers `runsync`. A host killed while
its worker holds a job: the job goes back to the queue as soon as the host is found unreachable
(before the worker's missed heartbeats would say so), runs to completion once on another host, a
replacement worker is placed on a healthy host, and a late result posted for the lost worker
changes nothing (the queue keeps the first result)."""

import contextlib
import json
import secrets
import shutil
import time
from pathlib import Path

import httpx
import pytest

from dstack.api import Resources, Serverless
from dstack.core.models.fleets import FleetConfiguration
from tests.conftest import running_server
from tests.fleets.hosts import wait_fleet_free
from tests.util import wait_for
from tests.wheelhouse import RUNPOD, runpod_wheelhouse

pytestmark = pytest.mark.slow

# all of a host's CPUs: two workers land on two different hosts, the third host stays free
WHOLE_HOST = Resources(cpu="2..", memory="0.1GB..", disk="1GB..")
# the server's default ping interval is 10 s: a worker is declared lost 40 s after its last ping
HEARTBEAT_DEADLINE = 40

HANDLER = """
import asyncio
import json
import os
import socket
import time

import runpod


def note(what, job):
    with open(os.path.join(os.environ["WORKER_LOG"], "handled.log"), "a") as f:
        f.write(json.dumps({"what": what, "job": job["id"], "host": socket.gethostname(),
                            "worker": os.environ["RUNPOD_POD_ID"], "at": time.time()}) + "\\n")


async def handler(job):
    note("start", job)
    await asyncio.sleep(job["input"].get("seconds", 0))
    note("done", job)
    return {"host": socket.gethostname(), "worker": os.environ["RUNPOD_POD_ID"], "value": job["input"].get("value")}


runpod.serverless.start({"handler": handler})
"""


@pytest.fixture(scope="module")
def wheelhouse() -> Path:
    return runpod_wheelhouse()


@pytest.fixture(scope="module")
def worker_log():
    """A folder every job user may write (under /tmp, which the sandbox leaves visible)."""
    d = Path(f"/tmp/dstack-fleet-sls-{secrets.token_hex(4)}")
    d.mkdir(mode=0o777)
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def endpoint(host_net, wheelhouse, worker_log, tmp_path_factory):
    """A server, a 3-host fleet and an endpoint with 2 workers, each on a host of its own."""
    with running_server(tmp_path_factory.mktemp("sls-server")) as srv:
        client = srv.client()
        hosts = host_net.hosts[:3]
        conf = FleetConfiguration.model_validate(
            {
                "type": "fleet",
                "name": "slsfleet",
                "ssh_config": {"identity_file": str(host_net.key), "hosts": [h.address for h in hosts]},
            }
        )
        client.fleets.apply(conf)
        wait_for(
            lambda: [i.status for i in client.fleets.get("slsfleet").instances],
            lambda s: s == ["idle"] * 3,
            180,
        )
        if any(i.resources["cpus"] < 2 for i in client.fleets.get("slsfleet").instances):
            pytest.skip("the hosts have fewer than 2 CPUs: one worker per host cannot be forced by resources")
        repo = tmp_path_factory.mktemp("sls-repo")
        (repo / "handler.py").write_text(HANDLER)
        sls = Serverless(
            setup=[f"pip install -q --no-index --find-links {wheelhouse} {RUNPOD}"],
            commands=["python handler.py"],
            env={"WORKER_LOG": str(worker_log)},
            resources=WHOLE_HOST,
            workers="2..2",
            fleets=["slsfleet"],
        )
        run = client.runs.submit(sls, run_name="fleet-sls", repo_dir=repo)
        try:
            yield srv, run, hosts
        finally:
            run.stop(abort=True)
            with contextlib.suppress(AssertionError):  # a killed host's job ends when the server gives it up
                wait_fleet_free(client, "slsfleet", 150)
            client.fleets.delete("slsfleet")


def _health(srv, run) -> dict:
    r = httpx.get(f"{run.endpoint_url}/health", headers=srv.headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _status(srv, run, job_id: str) -> dict:
    r = httpx.get(f"{run.endpoint_url}/status/{job_id}", headers=srv.headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _job_hosts(run, active_only: bool = False) -> list[str]:
    """The addresses of the hosts the run's worker jobs were placed on."""
    run.refresh()
    out = []
    for j in run.jobs:
        sub = j.job_submissions[-1]
        if sub.job_provisioning_data is not None and not (active_only and sub.status.is_finished()):
            out.append(sub.job_provisioning_data.hostname)
    return out


def _lines(log: Path) -> list[dict]:
    path = log / "handled.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _worker_token(endpoint_id: str) -> str:
    """The endpoint's worker token (every worker of it has the same), read from the environment
    of a worker's job process: root reads every /proc/PID/environ, and the hosts share this
    machine's PID namespace."""
    want = f"RUNPOD_ENDPOINT_ID={endpoint_id}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            items = environ.read_bytes().split(b"\0")
            if want in items:
                for item in items:
                    if item.startswith(b"RUNPOD_AI_API_KEY="):
                        return item.split(b"=", 1)[1].decode()
    raise AssertionError(f"no worker process of endpoint {endpoint_id} found")


def test_runsync_on_a_fleet_host(endpoint, host_net, worker_log):
    srv, run, hosts = endpoint
    # two workers, each pays a pip install from the wheelhouse on its host
    wait_for(lambda: _health(srv, run)["workers"], lambda w: w["idle"] + w["running"] == 2, 420, interval=1)
    r = httpx.post(f"{run.endpoint_url}/runsync", headers=srv.headers, json={"input": {"value": "hi"}}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "COMPLETED", body
    names = {h.name: h for h in hosts}
    assert body["output"]["value"] == "hi"
    host = names[body["output"]["host"]]  # the handler ran on a fleet host (its own hostname)
    assert host.address in _job_hosts(run, active_only=True)
    # the worker reached the server through the host's loopback: nothing listens on its address but sshd
    listeners = host.exec("ss", "-ltnH").stdout.splitlines()
    assert not [line for line in listeners if host.address in line and ":22 " not in line], listeners
    assert [line for line in listeners if "127.0.0.1:" in line], listeners


def test_host_killed_mid_job_requeued_and_completed_once(endpoint, host_net, worker_log):
    srv, run, hosts = endpoint
    wait_for(lambda: _health(srv, run)["workers"], lambda w: w["idle"] + w["running"] == 2, 420, interval=1)
    r = httpx.post(
        f"{run.endpoint_url}/run", headers=srv.headers, json={"input": {"seconds": 8, "value": "x"}}, timeout=30
    )
    assert r.status_code == 200, r.text
    job = r.json()["id"]
    st = wait_for(lambda: _status(srv, run, job), lambda s: s["status"] == "IN_PROGRESS", 60, interval=0.2)
    lost = st["workerId"]
    names = {h.name: h for h in hosts}
    first = wait_for(lambda: [x for x in _lines(worker_log) if x["job"] == job], lambda xs: len(xs) == 1, 30)[0]
    assert first["what"] == "start" and first["worker"] == lost, first
    victim = names[first["host"]]
    busy = _job_hosts(run, active_only=True)
    assert sorted(busy) == sorted({*busy}) and len(busy) == 2 and victim.address in busy, busy
    token = _worker_token(run.name)  # for the late post below
    killed_at = time.time()
    host_net.kill_host(victim)
    try:
        done = wait_for(lambda: _status(srv, run, job), lambda s: s["status"] == "COMPLETED", 150, interval=0.5)
        assert done["output"]["value"] == "x"
        survivor = done["workerId"]
        assert done["output"]["host"] != victim.name and survivor != lost, done
        lines = [x for x in _lines(worker_log) if x["job"] == job]
        starts = [x for x in lines if x["what"] == "start"]
        assert [x["host"] for x in starts][0] == victim.name, lines
        assert [x["host"] for x in lines if x["what"] == "done"] == [done["output"]["host"]], lines  # exactly once
        requeued_after = starts[1]["at"] - killed_at
        # requeued when the host was found unreachable, before a missed heartbeat could say so
        assert requeued_after < HEARTBEAT_DEADLINE - 10, requeued_after

        # a replacement worker is placed on the fleet's third, healthy host
        third = next(h for h in hosts if h.address not in busy)
        wait_for(lambda: _job_hosts(run, active_only=True).count(third.address), lambda n: n == 1, 60)

        # the lost worker's result, posted late, changes nothing: the first result stays
        late = httpx.post(
            f"{srv.url}/v2/{run.name}/job-done/{lost}/{job}?src=dstack&isStream=false",
            headers={"Authorization": token},
            content=json.dumps({"output": {"value": "late", "host": victim.name}}),
            timeout=10,
        )
        assert late.status_code < 500, late.text
        again = _status(srv, run, job)
        assert again["status"] == "COMPLETED" and again["output"] == done["output"], again
        assert again["workerId"] == survivor
    finally:
        host_net.link_up(victim)
        host_net.start_sshd(victim)
        host_net.wait_sshd(victim)
