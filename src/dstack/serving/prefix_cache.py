"""Which tokens the KV stream of each idle sequence slot still holds, so a new request that
starts with the same tokens (a chat's system prompt and earlier turns) skips their prefill.

Bookkeeping only: the engine moves KV data between slots (llama.cpp stream copies) and asks this
class where a prompt's longest cached prefix lies and which idle slot to park a finished
sequence's KV in. The cache is bounded by the number of slots the context was created with.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import numpy as np

#: Reusing fewer tokens than this from another slot is not worth a stream copy (bench/serving/bench_copy.py:
#: a copy of a 2048-cell stream costs ~2.3 ms, a prompt token ~5 ms, 2026-12-02).
MIN_REUSE_TOKENS = 2


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    def __init__(self, min_reuse: int = MIN_REUSE_TOKENS) -> None:
        self.min_reuse = min_reuse
        self._held: dict[int, np.ndarray] = {}
        self._used: dict[int, int] = {}
        self._clock = itertools.count()

    def hold(self, slot: int, tokens: Sequence[int] | np.ndarray) -> None:
        """`slot` is idle and its KV stream holds exactly `tokens` at positions 0..n-1."""
        if len(tokens) == 0:
            self.drop(slot)
            return
        self._held[slot] = np.asarray(tokens, dtype=np.int32)
        self._used[slot] = next(self._clock)

    def drop(self, slot: int) -> None:
        self._held.pop(slot, None)
        self._used.pop(slot, None)

    def move(self, src: int, dst: int) -> None:
        """`dst` now holds what `src` held (its stream was copied there); `src` holds nothing."""
        held = self._held.pop(src, None)
        self._used.pop(src, None)
        if held is None:
            self.drop(dst)
        else:
            self.hold(dst, held)

    def clear(self) -> None:
        self._held.clear()
        self._used.clear()

    def holds(self, slot: int) -> int:
        held = self._held.get(slot)
        return 0 if held is None else len(held)

    def best(self, prompt: Sequence[int], slots: Iterable[int], own: int) -> tuple[int | None, int]:
        """The idle slot whose KV shares the longest prefix with `prompt`, and that length.

        At least one prompt token is always left to compute (its logits start the generation).
        `own` is the slot the request will occupy: reusing it in place needs no copy, so any
        prefix counts there; another slot must share at least `min_reuse` tokens.
        """
        if not self._held or len(prompt) < 2:
            return None, 0
        p = np.asarray(prompt, dtype=np.int32)
        best_slot, best_len = None, 0
        for slot in slots:
            held = self._held.get(slot)
            if held is None:
                continue
            n = min(common_prefix(held, p), len(p) - 1)
            if n > best_len or (n == best_len and slot == own and n > 0):
                best_slot, best_len = slot, n
        if best_slot is None or (best_slot != own and best_len < self.min_reuse):
            return None, 0
        self._used[best_slot] = next(self._clock)
        return best_slot, best_len

    def parking_slot(self, idle: Iterable[int]) -> int | None:
        """An idle slot to keep a finished sequence's KV in: an empty one, else the least recently used."""
        idle = list(idle)
        if not idle:
            return None
        empty = [s for s in idle if s not in self._held]
        if empty:
            return min(empty)
        return min(idle, key=lambda s: self._used.get(s, -1))
