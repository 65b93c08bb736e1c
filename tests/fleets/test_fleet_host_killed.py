"""A fleet host killed mid-run (every process in it killed, its link down): the instance turns
`unreachable`, the run's job ends with the reason `instance_unreachable`; when the host comes
back (a fresh sshd, an empty home) the agent is deployed again and the host is `idle`."""

import time

import pytest

from dstack.api import Resources, RunStatus, Task
from dstack.core.models.fleets import FleetConfiguration
from dstack.core.models.runs import JobTerminationReason
from tests.conftest import running_server

pytestmark = pytest.mark.slow
SMALL = Resources(cpu="0..", memory="0.1GB..", disk="1GB..")


def _wait(what, predicate, timeout: float):
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = what()
        if predicate(value):
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s: {value}")


def test_host_killed_mid_run(host_net, tmp_path):
    host = host_net.hosts[2]
    with running_server(tmp_path, DSTACK_SERVER_AGENT_UNREACHABLE_SECONDS="10") as srv:
        client = srv.client()
        conf = FleetConfiguration.model_validate(
            {
                "type": "fleet",
                "name": "doomed",
                "ssh_config": {"identity_file": str(host_net.key), "hosts": [host.address]},
            }
        )
        client.fleets.apply(conf)
        _wait(lambda: client.fleets.get("doomed").instances[0].status, lambda s: s == "idle", 180)
        run = client.runs.submit(Task(commands=["sleep 600"], fleets=["doomed"], resources=SMALL), run_name="victim")

        def status():
            run.refresh()
            return run.status

        _wait(status, lambda s: s == RunStatus.RUNNING, 60)
        try:
            host_net.kill_host(host)
            inst = _wait(lambda: client.fleets.get("doomed").instances[0], lambda i: i.status == "unreachable", 60)
            assert inst.status_message
            _wait(status, lambda s: s.is_finished(), 120)
            sub = run.jobs[0].job_submissions[-1]
            assert run.status == RunStatus.FAILED, (run.status, run.error)
            assert sub.termination_reason == JobTerminationReason.INSTANCE_UNREACHABLE, sub
        finally:
            host_net.link_up(host)
            host_net.start_sshd(host)
            host_net.wait_sshd(host)
        # back: a fresh host (its home was a tmpfs of the killed namespace), so the agent is shipped again
        _wait(lambda: client.fleets.get("doomed").instances[0].status, lambda s: s == "idle", 180)
        client.fleets.delete("doomed")
