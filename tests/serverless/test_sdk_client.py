"""The runpod SDK's own client (`runpod.Endpoint`) against our endpoints.

conftest.py sets RUNPOD_ENDPOINT_BASE_URL before runpod is first imported; another test module
may have imported it already, so the fixture also points the SDK at this server (the SDK reads
`runpod.endpoint_url_base` on every call)."""

import time

import pytest

from .helpers import TOKEN

runpod = pytest.importorskip("runpod")


@pytest.fixture
def sdk(server):
    runpod.api_key = TOKEN
    runpod.endpoint_url_base = f"{server.url}/v2"
    return runpod


def test_sdk_run_status_output(sdk):
    ep = sdk.Endpoint("ep-sync")
    job = ep.run({"mode": "echo", "value": "sdk"})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    out = job.output(timeout=30)
    assert out["echo"] == "sdk"
    assert job.status() == "COMPLETED"


def test_sdk_run_sync(sdk):
    assert sdk.Endpoint("ep-sync").run_sync({"mode": "scalar", "value": 99}, timeout=30) == 99
    # per-endpoint api_key also works
    assert sdk.Endpoint("ep-async", api_key=TOKEN).run_sync({"input": {"mode": "echo", "value": 1}})["echo"] == 1


def test_sdk_stream(sdk):
    job = sdk.Endpoint("ep-agen").run({"n": 4, "delay": 0.3})
    assert list(job.stream()) == [f"token-{i}" for i in range(4)]


def test_sdk_cancel_health_purge(sdk):
    ep = sdk.Endpoint("ep-async")
    job = ep.run({"mode": "sleep", "seconds": 30})
    deadline = time.time() + 20
    while job.status() != "IN_PROGRESS" and time.time() < deadline:
        time.sleep(0.1)
    assert job.cancel()["status"] == "CANCELLED"
    health = ep.health()
    assert health["workers"]["idle"] + health["workers"]["running"] == 1
    idle = sdk.Endpoint("ep-idle")
    idle.rp_client.post("ep-idle/run", {"input": {}, "policy": {"lowPriority": True}})
    assert idle.purge_queue() == {"removed": 1, "status": "completed"}


def test_sdk_unauthorized(sdk):
    with pytest.raises(RuntimeError, match="401"):
        sdk.Endpoint("ep-sync", api_key="wrong").run({"x": 1})
