"""In-process wake-ups: a submit wakes waiting job-takers, a result wakes runsync, a cancel wakes
the worker's stop channel. Waiters always re-read the database, so a lost wake-up only costs the
safety re-check interval (which also covers other server replicas sharing PostgreSQL)."""

from __future__ import annotations

import asyncio


class _Gen:
    __slots__ = ("future", "waiters")

    def __init__(self) -> None:
        self.future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters = 0


class Signals:
    """Keyed broadcast: `fire(key)` wakes everybody in `wait(key)` at that moment."""

    def __init__(self) -> None:
        self._gens: dict[str, _Gen] = {}

    def fire(self, key: str) -> None:
        gen = self._gens.pop(key, None)
        if gen is not None and not gen.future.done():
            gen.future.set_result(None)

    def fire_all(self) -> None:
        for key in list(self._gens):
            self.fire(key)

    async def wait(self, key: str, timeout: float) -> bool:
        """True when fired, False on timeout."""
        if timeout <= 0:
            return False
        gen = self._gens.get(key)
        if gen is None:
            gen = self._gens[key] = _Gen()
        gen.waiters += 1
        try:
            await asyncio.wait_for(asyncio.shield(gen.future), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            gen.waiters -= 1
            if gen.waiters == 0 and self._gens.get(key) is gen:
                del self._gens[key]
