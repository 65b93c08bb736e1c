"""Jobs cannot read the server's or the agent's files, nor another project's processes (issue 10,
finding 2): a real server and agent, two users, two projects.

The server's home is put in a directory any user may enter, so what keeps a job out of it is the
agent's sandbox (agent.sandbox), not the mode of a directory above it."""

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from dstack.api import Client, Resources, RunStatus, Task
from tests.conftest import running_server
from tests.util import wait_until

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or os.geteuid() != 0
    or not (shutil.which("unshare") and shutil.which("setpriv")),
    reason="jobs run as other users only where the agent runs as root on Linux with util-linux (unshare, setpriv)",
)

SMALL = Resources(cpu="0..1", memory="0.3GB")
SECRET = "b-secret-" + os.urandom(6).hex()


@pytest.fixture(scope="module")
def srv():
    base = Path(tempfile.mkdtemp(prefix="dstack-isolation-"))
    os.chmod(base, 0o755)
    try:
        with running_server(base) as s:
            yield s
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def alice(srv):
    """The admin's client in `main` (project A)."""
    return srv.client()


@pytest.fixture(scope="module")
def bob(srv, alice):
    """A plain user with a project of their own (project B)."""
    user = alice.api.post("/api/users/create", {"username": "bob"})
    token = user["creds"]["token"]
    r = httpx.post(
        f"{srv.url}/api/projects/create", json={"project_name": "bobs"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 200, r.text
    return Client.from_config(project_name="bobs", server_url=srv.url, user_token=token)


def run_task(client, commands, timeout=120, **kw) -> str:
    run = client.runs.submit(Task(commands=commands, resources=SMALL, **kw))
    out = b"".join(run.logs()).decode(errors="replace")
    run.wait(timeout=timeout)
    assert run.status == RunStatus.DONE, (run.status, run.error, out)
    return out


def test_job_runs_as_an_unprivileged_user_in_its_own_files(alice, bob):
    out = run_task(alice, ["id -u", "echo data > out.txt", "stat -c '%u %a' out.txt . $HOME", "pwd", "echo HOME=$HOME"])
    lines = out.splitlines()
    uid = int(lines[0])
    assert uid != 0
    assert lines[1] == f"{uid} 644"  # the file is the job user's, in its working dir
    assert lines[2] == f"{uid} 700" and lines[3] == f"{uid} 700"  # code and home: private to that user
    assert lines[4].endswith("/repo")
    other = int(run_task(bob, ["id -u"]).split()[0])
    assert other not in (0, uid)  # another project, another user
    assert int(run_task(alice, ["id -u"]).split()[0]) == uid  # the same project keeps its user


def test_job_cannot_read_the_server_or_agent_files(srv, alice, bob):
    marker = "alice-output-" + os.urandom(6).hex()
    # a running job of alice's: the server deletes a job's files on the agent once it has ended
    long = alice.runs.submit(
        Task(commands=[f"echo {marker} > mine.txt", f"echo {marker}", "sleep 300"], resources=SMALL)
    )
    try:
        logs = long.logs()
        assert marker in next(logs).decode()
        agent_json = next(srv.home.rglob("agent.json"))
        agent_home = agent_json.parent
        agent_token = json.loads(agent_json.read_text())["token"]
        shared = [agent_home / "jobs", agent_home / "cache", agent_home / "users"]
        # the server's and the agent's own files, and what alice's job has (logs, state, code)
        files = [p for p in srv.home.rglob("*") if p.is_file() and not any(d in p.parents for d in shared)]
        files += [p for p in (agent_home / "jobs").rglob("*") if p.is_file()]
        assert any(p.name == "sqlite.db" for p in files) and any(p.name == "mine.txt" for p in files)
        out = run_task(
            bob,
            [f"cat {p} 2>&1 | head -c 300; echo" for p in files]
            + [f"ls {agent_home / 'jobs'} 2>&1 || true", "cat ~root/.dstack/config.yml 2>&1 || true", "echo done"],
        )
    finally:
        long.stop(abort=True)
    assert out.strip().endswith("done")
    for secret in (srv.token, agent_token, marker):
        assert secret not in out
    refusals = out.count("No such file or directory") + out.count("Permission denied")
    assert refusals >= len(files) + 2, out


def test_other_projects_processes_and_env_are_invisible(bob, alice):
    long = bob.runs.submit(Task(commands=["echo up", "sleep 300"], env={"B_SECRET": SECRET}, resources=SMALL))
    try:
        long.wait(statuses=(RunStatus.RUNNING,), timeout=120)
        # the job's shell is up: it printed, and runs `sleep 300` next
        wait_until(lambda: b"up" in b"".join(long.logs(follow=False)), 30, 0.2, "bob's job to start")
        out = run_task(
            alice,
            [
                "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -c B_SECRET || true",
                "ps -eo user,args",
                "cat /proc/*/cmdline 2>/dev/null | tr '\\0' ' '; echo",
            ],
        )
        assert SECRET not in out
        assert "B_SECRET" not in out.replace("grep -c B_SECRET", "")
        assert "sleep 300" not in out  # the other job's process is not even listed
        assert "ps -eo user,args" in out  # while the job's own processes are
        # the same probe from inside project B sees its own job (so the probe can see a process)
        out_b = run_task(bob, ["ps -eo args"])
        assert "sleep 300" in out_b
    finally:
        long.stop(abort=True)
