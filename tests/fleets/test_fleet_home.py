"""Jobs on fleet hosts call the server through their host's reverse forward: the server's URL in a
job's env is rewritten at provisioning (`services/fleets.with_home`), nothing else is touched, and
jobs elsewhere keep it as it is. `Home.of` turns a wildcard bind address into loopback."""

from types import SimpleNamespace

import pytest

from dstack.agent.models import AgentJobSubmission
from dstack.server.backends.ssh.backend import Home
from dstack.server.services import fleets

SERVER = "http://127.0.0.1:3000"


class _Forwarder:
    """Stands in for the running `SSHBackend`: one attached host whose forward is on port 41000."""

    home = Home.of(SERVER, "0.0.0.0", 3000)

    def home_url(self, name: str) -> str | None:
        return "http://127.0.0.1:41000" if name == "f-0" else None


def _submission() -> AgentJobSubmission:
    return AgentJobSubmission.model_validate(
        {
            "job_id": "j1",
            "commands": ["python handler.py"],
            "env": {
                "RUNPOD_WEBHOOK_GET_JOB": f"{SERVER}/v2/ep/job-take/$ID?src=dstack",
                "RUNPOD_WEBHOOK_PING": f"{SERVER}/v2/ep/ping/$RUNPOD_POD_ID?src=dstack",
                "OTHER": "http://127.0.0.1:30001/x",  # another port: not the server
                "PLAIN": "value",
            },
        }
    )


def test_server_url_rewritten_for_fleet_hosts(monkeypatch):
    monkeypatch.setattr(fleets, "_forwarder", _Forwarder())
    out = fleets.with_home(SimpleNamespace(backend="ssh", name="f-0"), _submission())
    assert out.env["RUNPOD_WEBHOOK_GET_JOB"] == "http://127.0.0.1:41000/v2/ep/job-take/$ID?src=dstack"
    assert out.env["RUNPOD_WEBHOOK_PING"] == "http://127.0.0.1:41000/v2/ep/ping/$RUNPOD_POD_ID?src=dstack"
    assert out.env["OTHER"] == "http://127.0.0.1:30001/x" and out.env["PLAIN"] == "value"


@pytest.mark.parametrize("backend,name", [("local", "local"), ("ssh", "f-9")])
def test_other_jobs_keep_the_server_url(monkeypatch, backend, name):
    """The server's own host, and a fleet host with no forward (not attached): unchanged."""
    monkeypatch.setattr(fleets, "_forwarder", _Forwarder())
    sub = _submission()
    assert fleets.with_home(SimpleNamespace(backend=backend, name=name), sub).env == sub.env


def test_home_of_bind_address():
    assert Home.of("http://example.com/", "0.0.0.0", 3000) == Home("http://example.com", "127.0.0.1", 3000)
    assert Home.of(SERVER, "::", 3000).host == "127.0.0.1"
    assert Home.of(SERVER, "10.0.0.5", 3000).host == "10.0.0.5"
