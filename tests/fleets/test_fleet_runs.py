"""Runs on fleet hosts: a task placed on a remote host (its code uploaded through the tunnel, its
output in the logs), and the server SIGKILLed and restarted while a remote job runs (the job
keeps running and is re-attached)."""

import time

import pytest

from dstack.api import Resources, RunStatus, Task
from tests.conftest import running_server
from tests.fleets.hosts import apply_fleet

pytestmark = pytest.mark.slow
SMALL = Resources(cpu="0..", memory="0.1GB..", disk="1GB..")  # the hosts' homes are small tmpfs


def test_task_runs_on_a_fleet_host(host_net, tmp_path):
    h0, h1 = host_net.hosts[:2]
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "data.txt").write_text("from-the-repo\n")
    with running_server(tmp_path) as srv:
        client = srv.client()
        apply_fleet(client, host_net, "runs", [h0, h1])
        task = Task(commands=["hostname", "cat data.txt"], fleets=["runs"], resources=SMALL)
        run = client.runs.submit(task, run_name="remote-task", repo_dir=repo)
        output = b"".join(run.logs()).decode()
        run.refresh()
        assert run.status == RunStatus.DONE, (run.status, run.error, output)
        lines = output.splitlines()
        assert lines[0] in {"h0", "h1"} and lines[1] == "from-the-repo", output
        jpd = run.jobs[0].job_submissions[-1].job_provisioning_data
        assert jpd.backend == "ssh" and jpd.region == "runs"
        client.fleets.delete("runs")


def test_remote_job_survives_a_server_kill(host_net, tmp_path):
    h2 = host_net.hosts[2]
    with running_server(tmp_path) as srv:
        client = srv.client()
        apply_fleet(client, host_net, "restart", [h2])
        task = Task(
            commands=["for i in $(seq 1 40); do echo tick-$i; sleep 0.25; done"], backends=["ssh"], resources=SMALL
        )
        run = client.runs.submit(task, run_name="long-remote")
        deadline = time.time() + 60
        while time.time() < deadline:
            run.refresh()
            if run.status == RunStatus.RUNNING:
                break
            time.sleep(0.2)
        assert run.status == RunStatus.RUNNING, (run.status, run.error)
        srv.kill()
        srv.start()
        client = srv.client()
        run = client.runs.get("long-remote")
        output = b"".join(run.logs()).decode()
        run.refresh()
        assert run.status == RunStatus.DONE, (run.status, run.error, output)
        ticks = [line for line in output.splitlines() if line.startswith("tick-")]
        assert ticks == [f"tick-{i}" for i in range(1, 41)], output  # every line once, none lost or repeated
        client.fleets.delete("restart")
