"""Pure parts: the scaler decision, settings, and the in-process signals."""

import asyncio

import pytest

from dstack.serverless.scaler import QueueSnapshot, desired_workers
from dstack.serverless.settings import EndpointSettings


def snap(queued=0, running=0, wait=0.0, live=0, init=0):
    return QueueSnapshot(queued, running, wait, live, init)


def test_first_job_at_zero_starts_one_and_min_kept():
    s = EndpointSettings(workers_min=0, workers_max=3)
    assert desired_workers(s, snap()) == 0
    assert desired_workers(s, snap(queued=1)) == 1
    assert desired_workers(EndpointSettings(workers_min=2, workers_max=3), snap()) == 2


def test_queue_delay_adds_one_at_a_time_up_to_max():
    s = EndpointSettings(workers_max=3, scaler_type="queue_delay", scaler_value=4)
    assert desired_workers(s, snap(queued=5, wait=1, live=1)) == 1
    assert desired_workers(s, snap(queued=5, wait=5, live=1)) == 2
    assert desired_workers(s, snap(queued=5, wait=5, live=2, init=1)) == 1  # one is on its way
    assert desired_workers(s, snap(queued=5, wait=50, live=3)) == 3


def test_request_count():
    s = EndpointSettings(workers_max=3, scaler_type="request_count", scaler_value=2)
    assert desired_workers(s, snap(queued=1)) == 1
    assert desired_workers(s, snap(queued=3, running=1)) == 2
    assert desired_workers(s, snap(queued=30)) == 3


def test_settings_validation_and_roundtrip():
    with pytest.raises(ValueError):
        EndpointSettings(workers_min=3, workers_max=2)
    s = EndpointSettings(workers_min=1, workers_max=4, scaler_type="request_count", scaler_value=0)
    assert s.scaler_value == 4
    assert EndpointSettings.from_json(s.to_json()) == s


def test_settings_from_configuration():
    conf = pytest.importorskip("dstack.core.models.configurations")
    c = conf.ServerlessConfiguration(
        commands=["python handler.py"],
        workers="1..5",
        idle_timeout=7,
        scaler={"type": "request_count"},
        execution_timeout=30,
    )
    s = EndpointSettings.from_configuration(c)
    assert (s.workers_min, s.workers_max, s.idle_timeout, s.scaler_type, s.scaler_value, s.execution_timeout) == (
        1,
        5,
        7,
        "request_count",
        4,
        30,
    )


def test_pool_wakeups_are_the_keyed_notifier():
    """The pool's long polls wait on the one keyed notifier (core.notifier), keyed as the pool keys them."""
    from dstack.core.notifier import KeyedNotifier

    notifier: KeyedNotifier[str] = KeyedNotifier()

    async def main():
        waiter = asyncio.ensure_future(notifier.wait("take:e1", 5))
        await asyncio.sleep(0.01)
        notifier.notify("take:e2")  # another key wakes nobody here
        await asyncio.sleep(0.01)
        assert not waiter.done()
        notifier.notify("take:e1")
        assert await waiter is True
        assert await notifier.wait("take:e1", 0.01) is False

    asyncio.run(main())
