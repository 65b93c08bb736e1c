"""Which tokens the KV stream of each idle sequence slot still holds, so a new request that
starts with the same tokens (a chat's system prompt and earlier turns) skips their prefill.

Bookkeeping only: the engine moves KV data between slots (llama.cpp stream copies) and asks this
class where a prompt's longest cached prefix lies and which idle slot to park a finished
sequence's KV in. The cache is bounded by the number of slots the context was created with.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Sequence

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


def extends(held: np.ndarray, tokens: np.ndarray) -> bool:
    """Whether `held` starts with all of `tokens` (a KV holding `held` holds `tokens` too)."""
    return len(held) >= len(tokens) and common_prefix(held, tokens) == len(tokens)


class PrefixCache:
    def __init__(self, min_reuse: int = MIN_REUSE_TOKENS) -> None:
        self.min_reuse = min_reuse
        self._held: dict[int, np.ndarray] = {}
        self._prompt: dict[int, int] = {}  # how many of the held tokens were the request's prompt
        self._used: dict[int, int] = {}
        self._clock = itertools.count()

    def hold(self, slot: int, tokens: Sequence[int] | np.ndarray, prompt_len: int | None = None) -> None:
        """`slot` is idle and its KV stream holds exactly `tokens` at positions 0..n-1, the first
        `prompt_len` of them (all when not given) the prompt of the request that left them."""
        if len(tokens) == 0:
            self.drop(slot)
            return
        self._held[slot] = np.asarray(tokens, dtype=np.int32)
        self._prompt[slot] = len(tokens) if prompt_len is None else min(prompt_len, len(tokens))
        self._used[slot] = next(self._clock)

    def drop(self, slot: int) -> None:
        self._held.pop(slot, None)
        self._prompt.pop(slot, None)
        self._used.pop(slot, None)

    def move(self, src: int, dst: int) -> None:
        """`dst` now holds what `src` held (its stream was copied there); `src` holds nothing."""
        held = self._held.get(src)
        prompt_len = self._prompt.get(src)
        self.drop(src)
        if held is None:
            self.drop(dst)
        else:
            self.hold(dst, held, prompt_len)

    def clear(self) -> None:
        self._held.clear()
        self._prompt.clear()
        self._used.clear()

    def held(self, slot: int) -> tuple[np.ndarray, int] | None:
        """The tokens `slot` holds and how many of them were a prompt; None when it holds nothing."""
        tokens = self._held.get(slot)
        return None if tokens is None else (tokens, self._prompt[slot])

    def holds(self, slot: int) -> int:
        held = self._held.get(slot)
        return 0 if held is None else len(held)

    def prompt_cut(self, slot: int, n: int) -> int:
        """How many tokens of the held request's prompt lie beyond position `n` (what keeping only
        `n` tokens of `slot` throws away, its generated tokens not counted)."""
        return max(0, self._prompt.get(slot, 0) - n)

    def best(self, prompt: Sequence[int], slots: Iterable[int], own: Collection[int]) -> tuple[int | None, int]:
        """The idle slot whose KV shares the longest prefix with `prompt`, and that length.

        At least one prompt token is always left to compute (its logits start the generation).
        `own` are the slots the request may occupy: reusing one of them in place needs no copy,
        so any prefix counts there and they win ties; another slot must share at least
        `min_reuse` tokens.
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
            if n > best_len or (n == best_len and n > 0 and slot in own and best_slot not in own):
                best_slot, best_len = slot, n
        if best_slot is None or (best_slot not in own and best_len < self.min_reuse):
            return None, 0
        self._used[best_slot] = next(self._clock)
        return best_slot, best_len

    def held_elsewhere(self, tokens: Sequence[int] | np.ndarray, slot: int | None = None) -> bool:
        """Whether an idle slot other than `slot` holds all of `tokens` (and maybe more after
        them): a copy of `tokens` would add nothing to the cache, so parking them is skipped. The
        slot that holds them counts as used now, since they are. Requests that repeat a prompt
        leave the same tokens in several slots (greedy decoding: prompt and output alike)."""
        t = np.asarray(tokens, dtype=np.int32)
        for other, held in self._held.items():
            if other != slot and extends(held, t):
                self._used[other] = next(self._clock)
                return True
        return False

    def parking_slot(self, idle: Iterable[int]) -> int | None:
        """An idle slot to keep a finished sequence's KV in: an empty one, else the least recently used."""
        idle = list(idle)
        if not idle:
            return None
        empty = [s for s in idle if s not in self._held]
        if empty:
            return min(empty)
        return min(idle, key=lambda s: self._used.get(s, -1))

    def park_target(self, slot: int, idle: Iterable[int]) -> int | None:
        """Where to keep what `slot` holds before a new sequence overwrites it: an empty idle slot,
        else the least recently used one if it was used before `slot`; None when `slot` holds too
        little to be reused, or every idle slot holds something used more recently (then `slot`'s
        prefix is the one the cache can best lose, and a copy would only lose another), or another
        slot holds the same tokens already."""
        if self.holds(slot) < self.min_reuse or self.held_elsewhere(self._held[slot], slot):
            return None
        park = self.parking_slot(s for s in idle if s != slot)
        if park is None or (park in self._held and self._used[park] > self._used[slot]):
            return None
        return park
