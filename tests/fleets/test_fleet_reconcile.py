"""A task that finishes while its host is away (link down: the host and its agent keep running,
the server cannot reach them): the instance turns `unreachable`; when the link is back the same
agent is re-attached (its reverse forward to the server on the same port) and the job is
reconciled from the agent's report: `done` with exit status 0, its output stored once."""

import json
import subprocess
import time

import pytest

from dstack.api import Resources, RunStatus, Task
from tests.conftest import running_server
from tests.fleets.hosts import apply_fleet
from tests.util import wait_for

pytestmark = pytest.mark.slow
SMALL = Resources(cpu="0..", memory="0.1GB..", disk="1GB..")
SLEEP = 30  # the task's length: longer than the ~20 s it takes to find the host unreachable


def _on_host(net, host, command: str) -> str:
    r = subprocess.run(
        ["ssh", "-i", str(net.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"root@{host.address}", command],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return r.stdout


def _home_forward(host) -> tuple[int, int]:
    """(port, sshd pid) of the one sshd listener on the host's loopback: the server's reverse forward."""
    found = []
    for line in host.exec("ss", "-ltnpH").stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[3].startswith("127.0.0.1:") and '"sshd"' in line:
            found.append((int(parts[3].rsplit(":", 1)[1]), int(line.split("pid=", 1)[1].split(",", 1)[0])))
    assert len(found) == 1, found
    return found[0]


def test_task_finished_while_host_away_is_reconciled_once(host_net, tmp_path):
    host = host_net.hosts[1]
    # the default 60 s that jobs wait for an unreachable agent: the host is back well within it
    with running_server(tmp_path) as srv:
        client = srv.client()
        apply_fleet(client, host_net, "away", [host])
        pid = json.loads(_on_host(host_net, host, "cat ~/.dstack/agent/home/agent.json"))["pid"]
        home_port, home_sshd = _home_forward(host)
        run = client.runs.submit(
            Task(commands=["echo started", f"sleep {SLEEP}", "echo finished-once"], fleets=["away"], resources=SMALL),
            run_name="away-task",
        )
        wait_for(lambda: b"".join(run.logs(follow=False)).decode(), lambda out: "started" in out, 120)
        started = time.monotonic()  # the job started no later than this
        try:
            host_net.link_down(host)
            wait_for(lambda: client.fleets.get("away").instances[0].status, lambda s: s == "unreachable", 60)
            run.refresh()
            assert not run.status.is_finished(), run.status  # held while its agent may come back
            time.sleep(max(0.0, started + SLEEP + 3 - time.monotonic()))  # it finishes on the host meanwhile
            assert client.fleets.get("away").instances[0].status == "unreachable"
        finally:
            host_net.link_up(host)
        wait_for(lambda: client.fleets.get("away").instances[0].status, lambda s: s in ("idle", "busy"), 90)

        def status():
            run.refresh()
            return run.status

        assert wait_for(status, lambda s: s.is_finished(), 60) == RunStatus.DONE, run.error
        sub = run.jobs[0].job_submissions[-1]
        assert sub.exit_status == 0, sub
        output = b"".join(run.logs()).decode()
        assert output.count("finished-once") == 1 and output.count("started") == 1, output
        assert json.loads(_on_host(host_net, host, "cat ~/.dstack/agent/home/agent.json"))["pid"] == pid
        # the forward to the server is back on the port it had (jobs there were told it), held by
        # the new connection's sshd: the stale session of the lost one was ended
        port, sshd = _home_forward(host)
        assert port == home_port and sshd != home_sshd, (home_port, home_sshd, port, sshd)
        client.fleets.delete("away")
