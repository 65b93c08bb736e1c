"""Prompt prefixes kept in host memory once no KV slot holds them.

The slots' KV streams are the first-level prefix cache (prefix_cache.py), but there are only as
many as the context was created with: a few more conversations than slots, or a burst of other
prompts, and a prefix is overwritten and its next request prefills it all again. Before that
happens the engine saves the sequence's KV cells (llama.cpp's per-sequence state, the cells it
holds and nothing else: ~12 KB a token for SmolLM2-135M with a q8_0 cache) here, and a request whose
longest cached prefix is here rather than in a slot has them written back into its slot:
restoring 72 tokens took 0.2 ms on a Xeon, against 3-5 ms a token to prefill them.

Bookkeeping only, bounded in bytes and in entries, least recently used first out. The entry bound
keeps the scheduler's work per request small: finding a prompt's longest prefix compares it with
every entry (~2 us each), and a small model's short prompts would otherwise fit thousands of
entries in the byte bound (2,000 entries: 3.8 ms per admission).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dstack.serving.prefix_cache import common_prefix, extends


@dataclass(frozen=True)
class SavedPrefix:
    tokens: np.ndarray  # the tokens at positions 0..n-1 of the saved sequence
    prompt_len: int  # how many of them were its request's prompt
    data: bytes  # llama.cpp's state of that sequence (llama_state_seq_get_data)


#: The most prefixes kept, whatever their size: a scan of them all costs ~0.5 ms.
MAX_ENTRIES = 256


class HostPrefixCache:
    def __init__(self, max_bytes: int, max_entries: int = MAX_ENTRIES) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.bytes = 0
        self._entries: OrderedDict[int, SavedPrefix] = OrderedDict()  # least recently used first
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def covers(self, tokens: Sequence[int] | np.ndarray) -> bool:
        """Whether an entry holds all of `tokens` (and maybe more after them)."""
        t = np.asarray(tokens, dtype=np.int32)
        return any(extends(e.tokens, t) for e in self._entries.values())

    def put(self, tokens: Sequence[int] | np.ndarray, prompt_len: int, data: bytes) -> None:
        """Keep `data` (the state of a sequence holding `tokens`), dropping entries it makes
        redundant (those whose tokens it starts with) and then the least recently used ones
        until both bounds hold. A state larger than the whole byte bound is not kept."""
        if len(data) > self.max_bytes:
            return
        t = np.asarray(tokens, dtype=np.int32)
        for key in [k for k, e in self._entries.items() if extends(t, e.tokens)]:
            self._remove(key)
        self._entries[next(self._ids)] = SavedPrefix(t, min(prompt_len, len(t)), data)
        self.bytes += len(data)
        while self.bytes > self.max_bytes or len(self._entries) > self.max_entries:
            self._remove(next(iter(self._entries)))

    def best(self, prompt: Sequence[int]) -> tuple[SavedPrefix | None, int]:
        """The entry sharing the longest prefix with `prompt` and that length; at least one prompt
        token is always left to compute (its logits start the generation)."""
        if not self._entries or len(prompt) < 2:
            return None, 0
        p = np.asarray(prompt, dtype=np.int32)
        best_key, best_len = None, 0
        for key, entry in self._entries.items():
            n = min(common_prefix(entry.tokens, p), len(p) - 1)
            if n > best_len:
                best_key, best_len = key, n
        if best_key is None:
            return None, 0
        self._entries.move_to_end(best_key)
        return self._entries[best_key], best_len

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _remove(self, key: int) -> None:
        self.bytes -= len(self._entries.pop(key).data)
