"""How long each step of bringing a fleet host up took, for one log line per host (and the
apply → idle benchmark, which reads it): where a slow deployment spends its time is then visible
without a profiler."""

from __future__ import annotations

import time


class Phases:
    """Named steps, each timed from the end of the previous one."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._last = self.started
        self.steps: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.steps.append((name, now - self._last))
        self._last = now

    def fork(self) -> Phases:
        """A copy that goes on separately (one per host of an apply)."""
        other = Phases()
        other.started, other._last, other.steps = self.started, self._last, list(self.steps)
        return other

    @property
    def total(self) -> float:
        return self._last - self.started

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.2f}" for name, seconds in self.steps)
