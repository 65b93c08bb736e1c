"""A fleet host killed mid-run (every process in it killed, its link down): the instance turns
`unreachable`, the run's job ends with the reason `instance_unreachable`; when the host comes
back (a fresh sshd, an empty home) the agent is deployed again and the host is `idle`."""

import pytest

from dstack.api import Resources, RunStatus, Task
from dstack.core.models.runs import JobTerminationReason
from tests.conftest import running_server
from tests.fleets.hosts import apply_fleet
from tests.util import wait_for

pytestmark = pytest.mark.slow
SMALL = Resources(cpu="0..", memory="0.1GB..", disk="1GB..")


def test_host_killed_mid_run(host_net, tmp_path):
    host = host_net.hosts[2]
    with running_server(tmp_path, DSTACK_SERVER_AGENT_UNREACHABLE_SECONDS="10") as srv:
        client = srv.client()
        apply_fleet(client, host_net, "doomed", [host])
        run = client.runs.submit(Task(commands=["sleep 600"], fleets=["doomed"], resources=SMALL), run_name="victim")

        def status():
            run.refresh()
            return run.status

        wait_for(status, lambda s: s == RunStatus.RUNNING, 60)
        try:
            host_net.kill_host(host)
            inst = wait_for(lambda: client.fleets.get("doomed").instances[0], lambda i: i.status == "unreachable", 60)
            assert inst.status_message
            wait_for(status, lambda s: s.is_finished(), 120)
            sub = run.jobs[0].job_submissions[-1]
            assert run.status == RunStatus.FAILED, (run.status, run.error)
            assert sub.termination_reason == JobTerminationReason.INSTANCE_UNREACHABLE, sub
        finally:
            host_net.link_up(host)
            host_net.start_sshd(host)
            host_net.wait_sshd(host)
        # back: a fresh host (its home was a tmpfs of the killed namespace), so the agent is shipped again
        wait_for(lambda: client.fleets.get("doomed").instances[0].status, lambda s: s == "idle", 180)
        client.fleets.delete("doomed")
