"""Log storage for one job: dense sequence numbers, a bounded in-memory window, a JSONL file.

Records live in memory only for the recent window (and only while the job runs) so a job printing
millions of lines keeps the agent's memory flat; older records are read back from ``logs.jsonl``
through a sparse offset index. Each record is kept as its encoded JSON line, so answering a pull
is a join of byte strings rather than a re-serialisation.
"""

from __future__ import annotations

import base64
import os
from array import array
from collections import deque
from pathlib import Path
from typing import BinaryIO

INDEX_STEP = 256  # one file offset remembered per this many records
MEMORY_RECORDS = 4096  # records kept in memory
MAX_BATCH_BYTES = 4 * 1024 * 1024  # about this much raw output per read
_PREFIX = b'{"seq":'


def _seq_of(line: bytes) -> int:
    """The seq of an encoded record; records always start with ``{"seq":N,``."""
    if not line.startswith(_PREFIX):
        raise ValueError("not a log record")
    return int(line[len(_PREFIX) : line.index(b",", len(_PREFIX))])


class LogStore:
    """Append-only log of one job, stored in memory (recent window) and in a file (everything)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last_seq = 0
        self._offsets = array("Q")  # file offset of seq k*INDEX_STEP+1
        self._recent: deque[tuple[bytes, int]] = deque(maxlen=MEMORY_RECORDS)  # (json, raw size)
        self._size = 0
        self._file: BinaryIO | None = None  # opened on first append, closed when the job ends
        if path.exists():
            self._reindex()

    def _reindex(self) -> None:
        """Rebuild the offset index and last seq from an existing file (agent restart)."""
        offset = 0
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    if not line.endswith(b"}\n") or _seq_of(line) != self.last_seq + 1:
                        break  # torn write at crash time: drop the rest
                except ValueError:
                    break
                self.last_seq += 1
                if (self.last_seq - 1) % INDEX_STEP == 0:
                    self._offsets.append(offset)
                offset += len(line)
        self._size = offset
        with open(self.path, "r+b") as f:
            f.truncate(offset)

    def append(self, stream: str, data: bytes, ts: float) -> None:
        """Store one record (one line of output, or a flushed partial line)."""
        self.last_seq += 1
        seq = self.last_seq
        encoded = b'{"seq":%d,"ts":%.6f,"stream":"%s","data":"%s"}' % (
            seq,
            ts,
            stream.encode(),
            base64.b64encode(data),
        )
        if (seq - 1) % INDEX_STEP == 0:
            self._offsets.append(self._size)
        if self._file is None:
            # 0600: jobs print secrets too
            self._file = open(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        self._file.write(encoded + b"\n")
        self._size += len(encoded) + 1
        self._recent.append((encoded, len(data)))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Stop writing: close the file and drop the memory window (reads go to the file)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._recent.clear()

    def read(self, cursor: int, limit: int) -> tuple[list[bytes], int]:
        """Encoded records with seq > cursor (at most ``limit``, about MAX_BATCH_BYTES) and the last seq."""
        cursor = max(cursor, 0)
        if cursor >= self.last_seq or limit <= 0:
            return [], cursor
        first_in_memory = self.last_seq - len(self._recent) + 1
        if cursor + 1 >= first_in_memory:
            out = self._read_memory(cursor + 1 - first_in_memory, limit)
        else:
            out = self._read_file(cursor, limit)
        return out, cursor + len(out)

    def _read_memory(self, start: int, limit: int) -> list[bytes]:
        out: list[bytes] = []
        size = 0
        for i in range(start, min(len(self._recent), start + limit)):
            encoded, raw = self._recent[i]
            if out and size + raw > MAX_BATCH_BYTES:
                break
            out.append(encoded)
            size += raw
        return out

    def _read_file(self, cursor: int, limit: int) -> list[bytes]:
        self.flush()
        out: list[bytes] = []
        size = 0
        seq = (cursor // INDEX_STEP) * INDEX_STEP  # seq of the record before the indexed offset
        with open(self.path, "rb") as f:
            f.seek(self._offsets[cursor // INDEX_STEP])
            for line in f:
                seq += 1
                if seq <= cursor:
                    continue
                if seq > self.last_seq:
                    break
                raw = len(line) * 3 // 4  # close enough: the data field dominates
                if out and size + raw > MAX_BATCH_BYTES:
                    break
                out.append(line.rstrip(b"\n"))
                size += raw
                if len(out) >= limit:
                    break
        return out
