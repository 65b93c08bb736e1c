"""Tasks end to end through the Python API against a real server, agent and database."""

import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from dstack.api import GPU, Resources, RunStatus, Task
from dstack.core.errors import ServerClientError
from dstack.core.models.runs import JobStatus, JobTerminationReason
from tests.util import wait_until

SMALL = Resources(cpu=1, memory="0.5GB")


def _answers_200(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(run, statuses, timeout=60):
    return run.wait(statuses=tuple(statuses), timeout=timeout)


def test_task_succeeds_with_code_env_and_logs(client, tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "hello.py").write_text("import os; print('hello from', os.environ['DSTACK_RUN_NAME'])\n")
    (tmp_path / "repo" / ".gitignore").write_text("big.bin\n")
    (tmp_path / "repo" / "big.bin").write_bytes(b"x" * 1000)
    task = Task(
        setup=["export GREETING=hi"],
        commands=[
            "echo $GREETING",
            "python hello.py",
            "test ! -e big.bin && echo ignored-ok",
            "echo nodes=$DSTACK_NODES_NUM job=$DSTACK_JOB_NUM",
            "echo $MY_VAR",
        ],
        env={"MY_VAR": "from-env"},
        resources=SMALL,
    )
    run = client.runs.submit(task, run_name="hello-task", repo_dir=tmp_path / "repo")
    assert run.name == "hello-task"
    output = b"".join(run.logs()).decode()
    run.refresh()
    assert run.status == RunStatus.DONE, (run.status, run.error, output)
    assert output.splitlines() == ["hi", "hello from hello-task", "ignored-ok", "nodes=1 job=0", "from-env"]
    sub = run.jobs[0].job_submissions[-1]
    assert sub.status == JobStatus.DONE and sub.exit_status == 0
    assert sub.termination_reason == JobTerminationReason.DONE_BY_RUNNER


def test_random_name_and_listing(client):
    run = client.runs.submit(Task(commands=["true"], resources=SMALL))
    assert len(run.name.split("-")) == 3
    wait_for(run, [RunStatus.DONE])
    names = [r.name for r in client.runs.list(all=True)]
    assert run.name in names
    assert client.runs.get(run.name).status == RunStatus.DONE
    assert client.runs.get("no-such-run") is None


def test_failing_task_reports_exit_status(client):
    run = client.runs.submit(Task(commands=["echo before", "exit 7", "echo never"], resources=SMALL))
    out = b"".join(run.logs()).decode()
    run.refresh()
    assert run.status == RunStatus.FAILED
    assert out.strip() == "before"
    assert run.jobs[0].job_submissions[-1].exit_status == 7
    assert run.error == "exit status 7"


def test_stop_and_abort(client):
    stopped = client.runs.submit(
        Task(commands=["trap 'echo got-term; exit 0' TERM; echo started; sleep 60 & wait"], resources=SMALL)
    )
    aborted = client.runs.submit(Task(commands=["echo started; sleep 60"], resources=SMALL))
    for run in (stopped, aborted):
        wait_for(run, [RunStatus.RUNNING])
    # The shells have installed their traps once they print.
    for run in (stopped, aborted):
        wait_until(lambda run=run: b"started" in b"".join(run.logs(follow=False)), 30, 0.1, f"{run.name} to start")
    stopped.stop()
    aborted.stop(abort=True)
    wait_for(stopped, [])
    wait_for(aborted, [])
    assert stopped.status == RunStatus.TERMINATED
    assert stopped.jobs[0].job_submissions[-1].termination_reason == JobTerminationReason.TERMINATED_BY_USER
    assert "got-term" in b"".join(stopped.logs()).decode()
    assert aborted.status == RunStatus.TERMINATED
    assert aborted.jobs[0].job_submissions[-1].status == JobStatus.ABORTED
    assert aborted.jobs[0].job_submissions[-1].termination_reason == JobTerminationReason.ABORTED_BY_USER


def test_stop_right_after_submit_is_not_lost(client):
    # The stop lands while the pipeline is placing the job or reporting it running: the
    # pipeline's older view of the run must not overwrite it.
    runs = [
        client.runs.submit(Task(commands=["sleep 120"], resources=Resources(cpu=0, memory="0.1GB"))) for _ in range(3)
    ]
    for i, run in enumerate(runs):
        if i:
            time.sleep(0.05 * i)  # a little later each time: before, during and after placement
        run.stop()
    for run in runs:
        wait_for(run, [], timeout=30)
        assert run.status == RunStatus.TERMINATED, run.status
        assert run.jobs[0].job_submissions[-1].termination_reason == JobTerminationReason.TERMINATED_BY_USER


def test_max_duration(client):
    run = client.runs.submit(Task(commands=["sleep 60"], max_duration="2s", resources=SMALL))
    t0 = time.time()
    wait_for(run, [], timeout=30)
    assert run.status == RunStatus.TERMINATED
    assert run.jobs[0].job_submissions[-1].termination_reason == JobTerminationReason.MAX_DURATION_EXCEEDED
    assert time.time() - t0 < 20


def test_retry_after_failure(client, tmp_path):
    # Jobs may run as another user (agent.sandbox): the marker's directory must be theirs to write.
    shared = Path(tempfile.mkdtemp(prefix="dstack-test-"))
    os.chmod(shared, 0o777)
    marker = shared / "attempt"
    # Fails the first time, succeeds on the retry (the server fixture uses short retry delays).
    cmd = f"if [ -e {marker} ]; then echo second; else touch {marker}; echo first; exit 1; fi"
    run = client.runs.submit(Task(commands=[cmd], retry={"on_events": ["error"], "duration": "1m"}, resources=SMALL))
    wait_for(run, [], timeout=60)
    assert run.status == RunStatus.DONE, run.error
    subs = run.jobs[0].job_submissions
    assert [s.status for s in subs] == [JobStatus.FAILED, JobStatus.DONE]
    assert b"".join(run.logs()).decode().split() == ["first", "second"]
    shutil.rmtree(shared, ignore_errors=True)


def test_two_tasks_at_once_and_one_that_does_not_fit(client):
    host_cpus = client.runs.get_run_plan(Task(commands=["true"], resources=SMALL)).job_plans[0].offers[0].resources.cpus
    half = max(1, host_cpus // 2)
    a = client.runs.submit(Task(commands=["sleep 3"], resources=Resources(cpu=half, memory="0.5GB")))
    b = client.runs.submit(Task(commands=["sleep 3"], resources=Resources(cpu=half, memory="0.5GB")))
    wait_for(a, [RunStatus.RUNNING])
    wait_for(b, [RunStatus.RUNNING])
    a.refresh()
    assert a.status == RunStatus.RUNNING and b.status == RunStatus.RUNNING
    # The host is now full: without retry a third fails at once with no capacity...
    c = client.runs.submit(Task(commands=["true"], resources=Resources(cpu=half, memory="0.5GB")))
    wait_for(c, [])
    assert c.status == RunStatus.FAILED
    assert c.jobs[0].job_submissions[-1].termination_reason == JobTerminationReason.FAILED_TO_START_DUE_TO_NO_CAPACITY
    # ...and with retry on no-capacity it waits until the others finish.
    d = client.runs.submit(
        Task(
            commands=["echo waited"],
            retry={"on_events": ["no-capacity"], "duration": "2m"},
            resources=Resources(cpu=half, memory="0.5GB"),
        )
    )
    time.sleep(1)  # it is still waiting a second later: the wait is what is checked
    d.refresh()
    assert d.status == RunStatus.SUBMITTED
    wait_for(d, [], timeout=60)
    assert d.status == RunStatus.DONE
    assert b"".join(d.logs()).decode().strip() == "waited"


def test_request_no_backend_can_meet_fails_clearly(client):
    with pytest.raises(ServerClientError) as e:
        client.runs.submit(Task(commands=["nvidia-smi"], resources=Resources(gpu=GPU(memory="24GB"))))
    msg = str(e.value)
    assert "24GB" in msg and "available" in msg and "xCPU" in msg
    # The same request without the GPU works.
    run = client.runs.submit(Task(commands=["echo ok"], resources=SMALL))
    wait_for(run, [])
    assert run.status == RunStatus.DONE


def test_ten_thousand_log_lines_intact(client):
    run = client.runs.submit(
        Task(commands=["python -c \"[print(f'line {i:05d}') for i in range(10000)]\""], resources=SMALL)
    )
    lines = b"".join(run.logs()).decode().splitlines()
    assert lines == [f"line {i:05d}" for i in range(10000)]


def test_job_python_version_and_isolated_pip(client, server):
    run = client.runs.submit(
        Task(python="3.12", commands=["python --version", "python -c 'import sys; print(sys.prefix)'"], resources=SMALL)
    )
    out = b"".join(run.logs()).decode()
    run.refresh()
    if run.status == RunStatus.FAILED and "3.12" in (run.jobs[0].job_submissions[-1].termination_reason_message or ""):
        pytest.skip("Python 3.12 is not installed on this host")
    assert run.status == RunStatus.DONE, out
    assert "Python 3.12" in out
    assert str(server.home) in out  # the job's own venv, not the server's environment


def test_auth_required_and_projects_isolated(server, client):
    r = httpx.post(f"{server.url}/api/project/main/runs/list", json={})
    assert r.status_code == 401 and "Bearer" in r.json()["detail"][0]["msg"]
    r = httpx.post(f"{server.url}/api/project/main/runs/list", json={}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    # A second user with their own project cannot see or touch `main`.
    user = client.api.post("/api/users/create", {"username": "bob"})
    bob_headers = {"Authorization": f"Bearer {user['creds']['token']}"}
    r = httpx.post(f"{server.url}/api/projects/create", json={"project_name": "bobs"}, headers=bob_headers)
    assert r.status_code == 200
    r = httpx.post(f"{server.url}/api/project/main/runs/list", json={}, headers=bob_headers)
    assert r.status_code == 403 and "not a member" in r.json()["detail"][0]["msg"]
    r = httpx.post(
        f"{server.url}/api/project/main/runs/submit",
        json={"run_spec": {"configuration": {"type": "task", "commands": ["true"]}}},
        headers=bob_headers,
    )
    assert r.status_code == 403
    r = httpx.post(f"{server.url}/api/projects/list", json={}, headers=bob_headers)
    assert [p["project_name"] for p in r.json()] == ["bobs"]
    r = httpx.post(f"{server.url}/api/users/list", json={}, headers=bob_headers)
    assert r.status_code == 403


def test_invalid_configuration_over_http_names_the_field(server):
    r = httpx.post(
        f"{server.url}/api/project/main/runs/submit",
        headers=server.headers,
        json={
            "run_spec": {"configuration": {"type": "task", "commands": ["true"], "resources": {"gpu": "A100:xx:yy"}}}
        },
    )
    assert r.status_code == 400
    assert "resources.gpu" in r.json()["detail"][0]["msg"]


def test_plan_forms_backends_and_repos(client, tmp_path):
    task = Task(commands=["echo planned"], resources=SMALL)
    plan = client.runs.get_plan(task, run_name="plan-015")  # dstack 0.15 style
    assert plan.job_plans[0].offers[0].backend == "local"
    run = client.runs.exec_plan(plan)
    assert run.name == "plan-015"
    run = client.runs.apply_configuration(Task(commands=["echo applied"], resources=SMALL), run_name="plan-now")
    run.wait(timeout=60)
    assert b"".join(run.logs()).decode().strip() == "applied"
    assert [b["name"] for b in client.backends.list()] == ["local"]
    assert client.repos.init(tmp_path)


def test_seed_api_example_flow(client):
    """The API page's example: submit, attach, stream logs, stop(abort=True), detach."""
    import sys

    task = Task(commands=["python -m http.server 8123"], ports=["8123"], env={"MODEL_ID": "x"})
    with pytest.raises(ServerClientError):  # no GPU on this host: refused with what exists
        client.runs.submit(run_name="my-awesome-run", configuration=task, resources=Resources(gpu=GPU(memory="24GB")))
    run = client.runs.submit(run_name="my-awesome-run", configuration=task, resources=SMALL)
    assert run.attach(timeout=60)
    try:
        wait_until(lambda: _answers_200("http://localhost:8123/"), 30, 0.2, "the forwarded port to answer")
        run.stop(abort=True)
        for log in run.logs():
            sys.stdout.buffer.write(log)
        run.refresh()
        assert run.status == RunStatus.TERMINATED
    finally:
        run.detach()
