"""A server killed with SIGKILL mid-run comes back, follows its jobs to the end, and loses no log line."""

import time

from dstack.api import Resources, RunStatus, Task
from tests.util import wait_until


def test_server_sigkill_and_restart_mid_run(fresh_server):
    client = fresh_server.client()
    # Prints a numbered line every 15 ms for ~12 s, spanning the kill and the restart.
    cmd = "python -c \"import time\nfor i in range(800):\n    print(f'n {i}', flush=True); time.sleep(0.015)\""
    run = client.runs.submit(Task(commands=[cmd], resources=Resources(cpu=1, memory="0.5GB")), run_name="survivor")
    run.wait(statuses=(RunStatus.RUNNING,), timeout=60)
    wait_until(lambda: b"n 20\n" in b"".join(run.logs(follow=False)), 30, 0.1, "the first lines to be stored")
    fresh_server.kill()
    time.sleep(1.0)  # the server stays down a while (the job goes on printing): the outage under test
    fresh_server.start()
    client = fresh_server.client()
    run = client.runs.get("survivor")
    # The job kept running while the server was down (on a very loaded machine it may even have ended).
    assert run.status in (RunStatus.RUNNING, RunStatus.DONE)
    run.wait(timeout=60)
    assert run.status == RunStatus.DONE, run.error
    lines = b"".join(run.logs()).decode().splitlines()
    assert lines == [f"n {i}" for i in range(800)]


def test_queued_run_survives_restart(fresh_server):
    client = fresh_server.client()
    run = client.runs.submit(
        Task(commands=["echo after-restart"], resources=Resources(cpu=1, memory="0.5GB")), run_name="queued"
    )
    fresh_server.kill()
    fresh_server.start()
    run = fresh_server.client().runs.get("queued")
    run.wait(timeout=60)
    assert run.status == RunStatus.DONE
    assert b"".join(run.logs()).decode().strip() == "after-restart"
