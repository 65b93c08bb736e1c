"""Building a sequence's output text token by token: UTF-8 and stop sequences.

A token can end inside a multi-byte character, and a stop sequence can span several tokens, so
the text is grown incrementally and only the part that can no longer become a stop sequence is
released to streaming clients.
"""

from __future__ import annotations

import codecs


class OutputText:
    """Accumulates generated text, detects stop sequences, and hands out safe deltas."""

    def __init__(self, stop: list[str]) -> None:
        self.stop = [s for s in stop if s]
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self._released = 0
        self.stopped_at: int | None = None

    def append(self, data: bytes) -> str:
        """Add a token's bytes; return its text (may be empty mid-character)."""
        piece = self._decoder.decode(data)
        if not piece:
            return ""
        start = max(0, len(self.text) - self._max_stop + 1)
        self.text += piece
        if self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.stopped_at = min(hits)
        return piece

    def flush(self) -> str:
        """Text of trailing incomplete bytes at the end of generation."""
        piece = self._decoder.decode(b"", final=True)
        self.text += piece
        return piece

    @property
    def final(self) -> str:
        return self.text if self.stopped_at is None else self.text[: self.stopped_at]

    def release(self, finished: bool = False) -> str:
        """New text that is certain to be output: never a possible start of a stop sequence."""
        if finished or self.stopped_at is not None:
            end = len(self.final)
        else:
            end = len(self.text) - self._held()
        end = max(end, self._released)
        delta = self.text[self._released : end]
        self._released = end
        return delta

    def _held(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop sequence."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best
