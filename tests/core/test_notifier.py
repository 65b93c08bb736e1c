"""The keyed notifier (dstack.core.notifier): who wakes, what is not lost, what is not kept."""

from __future__ import annotations

import asyncio

from dstack.core.notifier import KeyedNotifier


def test_notify_wakes_every_waiter_of_that_key_only():
    async def main() -> None:
        n: KeyedNotifier[str] = KeyedNotifier()
        a1 = asyncio.create_task(n.wait("a", 5))
        a2 = asyncio.create_task(n.wait("a", 5))
        b = asyncio.create_task(n.wait("b", 0.3))
        await asyncio.sleep(0)  # one turn of the loop: each task runs until it waits
        assert n.waiting("a") == 2 and n.waiting("b") == 1
        n.notify("a")
        assert await a1 is True and await a2 is True
        assert await b is False  # another key's notify does not wake it: it times out
        assert n.waiting("a") == 0 and n.waiting("b") == 0  # nothing kept once nobody waits

    asyncio.run(main())


def test_a_notify_between_subscribe_and_wait_is_not_lost():
    async def main() -> None:
        n: KeyedNotifier[int] = KeyedNotifier()
        with n.subscribe(7) as sub:
            n.notify(7)  # as if the state changed after the subscriber read it
            assert sub.notified
            assert await sub.wait(0) is True
        with n.subscribe(7) as later:  # a new round: the earlier notify is spent
            assert await later.wait(0.05) is False
        assert n.waiting(7) == 0

    asyncio.run(main())


def test_notify_all_and_timeouts():
    async def main() -> None:
        n: KeyedNotifier[str] = KeyedNotifier()
        waits = [asyncio.create_task(n.wait(k, 5)) for k in ("x", "y")]
        await asyncio.sleep(0)
        assert n.waiting("x") == 1 and n.waiting("y") == 1
        n.notify_all()
        assert await asyncio.gather(*waits) == [True, True]
        assert await n.wait("x", 0) is False  # no time to wait, nothing notified
        n.notify("nobody")  # a notify nobody waits for is dropped
        assert n.waiting("nobody") == 0

    asyncio.run(main())
