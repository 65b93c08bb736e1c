"""Where the agent cannot give jobs their own network namespaces, a second job on the same port
is refused with a message that says why (the agent's isolation is switched off here)."""

import pytest

from dstack.api import Resources, RunStatus, Service
from tests.conftest import running_server


@pytest.fixture
def plain_server(tmp_path):
    with running_server(tmp_path, "sqlite", DSTACK_AGENT_NO_NETNS="1") as srv:
        yield srv


def test_second_replica_on_the_same_port_is_refused(plain_server):
    client = plain_server.client()
    conf = Service(commands=["python -m http.server 8000"], port=8000, resources=Resources(cpu=1, memory="0.3GB"))
    first = client.runs.submit(conf, run_name="first")
    first.wait(statuses=(RunStatus.RUNNING,), timeout=60)
    second = client.runs.submit(conf, run_name="second")
    try:
        second.wait(timeout=60)
        assert second.status == RunStatus.FAILED
        message = second.jobs[0].job_submissions[-1].termination_reason_message
        assert "port 8000" in message and "network namespaces" in message
    finally:
        first.stop(abort=True)
        second.stop(abort=True)
