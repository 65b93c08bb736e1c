"""Keyed wake-ups inside one event loop: `notify(key)` wakes every waiter on that key at that moment.

Waiters re-read their real state (a database, a process) after waking: a notification says "look
again", it carries no data, and one that nobody waits for is dropped. The waiter that must not miss
a change made between its read and its wait subscribes *before* reading:

    with notifier.subscribe(run_id) as sub:
        rows = await read()
        if not rows:
            await sub.wait(timeout)

A key's state exists only while somebody is subscribed to it, so keys never accumulate.

`version` counts notifications and `wait_any` wakes on a notify of any key: one watcher of many
keys (an agent's watch over all its jobs) waits once, not once per key.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable
from types import TracebackType
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class _Round:
    """The subscribers of one key until its next notify."""

    __slots__ = ("event", "holders")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.holders = 0


class Subscription(Generic[K]):
    """One waiter's place in a key's current round; `wait` returns at once if notified since."""

    def __init__(self, owner: KeyedNotifier[K], key: K, round_: _Round) -> None:
        self._owner = owner
        self._key = key
        self._round = round_
        self._open = True

    @property
    def notified(self) -> bool:
        return self._round.event.is_set()

    async def wait(self, timeout: float) -> bool:
        """Until the key is notified (True) or `timeout` seconds pass (False)."""
        if self._round.event.is_set():
            return True
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._round.event.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        if self._open:
            self._open = False
            self._owner._release(self._key, self._round)

    def __enter__(self) -> Subscription[K]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class KeyedNotifier(Generic[K]):
    """Broadcast per key: log followers per run, job takers per endpoint, waiters for an agent."""

    def __init__(self) -> None:
        self._rounds: dict[K, _Round] = {}
        #: how many notifications there have been (of any key); a watcher compares it with the
        #: value it last saw to know whether anything changed meanwhile
        self.version = 0
        self._any: asyncio.Event | None = None  # set by the next notify of any key

    def subscribe(self, key: K) -> Subscription[K]:
        """Join the key's current round; close the subscription (or use it as a context manager)."""
        round_ = self._rounds.get(key)
        if round_ is None:
            round_ = self._rounds[key] = _Round()
        round_.holders += 1
        return Subscription(self, key, round_)

    async def wait(self, key: K, timeout: float) -> bool:
        """Subscribe and wait: True when `key` is notified within `timeout` seconds."""
        with self.subscribe(key) as sub:
            return await sub.wait(timeout)

    def notify(self, key: K) -> None:
        """Wake everybody subscribed to `key` now; later subscribers wait for the next notify."""
        self.version += 1
        round_ = self._rounds.pop(key, None)
        if round_ is not None:
            round_.event.set()
        any_ = self._any
        if any_ is not None:
            self._any = None
            any_.set()

    async def wait_any(self, timeout: float) -> bool:
        """Until the next notify of any key (True) or `timeout` seconds pass (False)."""
        if timeout <= 0:
            return False
        if self._any is None:
            self._any = asyncio.Event()
        try:
            await asyncio.wait_for(self._any.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def notify_all(self) -> None:
        for key in list(self._rounds):
            self.notify(key)

    def waiting(self, key: K) -> int:
        """How many subscriptions the key's current round has (for tests and metrics)."""
        round_ = self._rounds.get(key)
        return round_.holders if round_ is not None else 0

    def _release(self, key: K, round_: _Round) -> None:
        round_.holders -= 1
        if round_.holders == 0 and self._rounds.get(key) is round_:
            del self._rounds[key]
