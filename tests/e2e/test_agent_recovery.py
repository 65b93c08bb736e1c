"""A SIGKILLed agent comes back: the server notices within seconds, starts a new agent, ends the
jobs the dead one ran as "agent lost" (retried under `retry`), runs new tasks, and serverless
endpoints go on serving."""

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from dstack.api import Resources, RunStatus, Serverless, Task
from tests.conftest import running_server
from tests.e2e.test_serverless import HANDLER, SETUP
from tests.util import wait_until

SMALL = Resources(cpu=1, memory="0.3GB")


def _agent(srv) -> dict | None:
    try:
        return json.loads((srv.home / "server" / "local-agent" / "agent.json").read_text())
    except (OSError, ValueError):
        return None


def _kill_agent(srv) -> int:
    pid = _agent(srv)["pid"]
    os.kill(pid, signal.SIGKILL)  # the agent alone: its jobs run in their own sessions
    return pid


def _wait_new_agent(srv, old_pid: int, timeout: float) -> dict:
    """The agent that replaced `old_pid`, once it answers its healthcheck."""

    def new_agent() -> dict | None:
        info = _agent(srv)
        if not info or info["pid"] == old_pid:
            return None
        try:
            r = httpx.get(f"http://127.0.0.1:{info['port']}/api/healthcheck", timeout=2)
        except httpx.HTTPError:
            return None
        return info if r.status_code == 200 and r.json()["pid"] == info["pid"] else None

    return wait_until(new_agent, timeout, 0.2, f"a new agent after killing pid {old_pid}")


def _submission(run):
    run.refresh()
    return run.jobs[0].job_submissions[-1]


def _ps(srv) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", "ps", "-a"],
        env={**srv.env, "COLUMNS": "300"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_killed_agent_is_replaced_and_its_jobs_reconciled(tmp_path):
    with running_server(tmp_path) as srv:
        client = srv.client()
        victim = client.runs.submit(Task(commands=["sleep 600"], resources=SMALL), run_name="victim")
        retried = client.runs.submit(
            Task(
                commands=["echo attempt; sleep 600"],
                resources=SMALL,
                retry={"on_events": ["interruption"], "duration": "10m"},
            ),
            run_name="retried",
        )
        victim.wait(statuses=(RunStatus.RUNNING,), timeout=90)
        retried.wait(statuses=(RunStatus.RUNNING,), timeout=90)

        old_pid = _kill_agent(srv)
        new = _wait_new_agent(srv, old_pid, timeout=15)
        assert new["pid"] != old_pid

        # The job the dead agent ran ends with the reason, and `dstack ps` says so.
        victim.wait(timeout=60)
        assert victim.status == RunStatus.FAILED
        sub = _submission(victim)
        assert sub.termination_reason.value == "instance_unreachable"
        assert "agent lost" in sub.termination_reason_message
        assert "agent lost" in _ps(srv)

        # The one with `retry` on interruption is submitted again and runs on the new agent.
        wait_until(
            lambda: len(s := retried.refresh().jobs[0].job_submissions) >= 2 and s[-1].status.value == "running",
            120,
            0.5,
            "the retried job to run on the new agent",
        )
        subs = retried.jobs[0].job_submissions
        assert len(subs) >= 2 and subs[-1].status.value == "running", [(s.status, s.termination_reason) for s in subs]
        assert subs[0].termination_reason.value == "instance_unreachable"
        assert "agent lost" in subs[0].termination_reason_message
        retried.stop(abort=True)

        # New tasks run as usual.
        fresh = client.runs.submit(Task(commands=["echo after the agent died"], resources=SMALL), run_name="fresh")
        fresh.wait(timeout=90)
        assert fresh.status == RunStatus.DONE, fresh.error
        assert b"".join(fresh.logs()).decode().strip() == "after the agent died"

        # The server's log names the loss once, with both pids.
        logs = srv.logs(tail=10**7)
        assert f"pid {old_pid}" in logs and f"pid {new['pid']}" in logs


def test_serverless_endpoint_serves_after_agent_kill(tmp_path):
    with running_server(tmp_path) as srv:
        repo = tmp_path / "repo"
        repo.mkdir()
        (repo / "handler.py").write_text(HANDLER)
        conf = Serverless(
            setup=SETUP, commands=["python handler.py"], resources=Resources(cpu=0, memory="0.3GB"), workers="1..2"
        )
        run = srv.client().runs.submit(conf, run_name="sls-survivor", repo_dir=repo)
        url = run.endpoint_url

        def runsync(value: str, timeout: float) -> dict:
            deadline = time.time() + timeout
            while True:
                r = httpx.post(
                    f"{url}/runsync?wait=30000", headers=srv.headers, json={"input": {"value": value}}, timeout=60
                )
                assert r.status_code == 200, r.text
                body = r.json()
                if body.get("status") == "COMPLETED" or time.time() > deadline:
                    return body
                job_id = body["id"]
                while body.get("status") in ("IN_QUEUE", "IN_PROGRESS") and time.time() < deadline:
                    body = httpx.get(f"{url}/status/{job_id}", headers=srv.headers, timeout=10).json()
                    time.sleep(0.5)
                if body.get("status") == "COMPLETED":
                    return body

        before = runsync("before", timeout=300)  # the first worker pays the pip install
        assert before["status"] == "COMPLETED", before
        assert before["output"]["echo"] == "before"

        old_pid = _kill_agent(srv)
        _wait_new_agent(srv, old_pid, timeout=15)
        after = runsync("after", timeout=180)
        assert after["status"] == "COMPLETED", after
        assert after["output"]["echo"] == "after"
        # A worker of the new agent answered: the old worker's processes were stopped with it.
        assert after["output"]["worker"] != before["output"]["worker"]
