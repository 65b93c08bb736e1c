"""Limits on code archives, applied member by member while they are read or extracted.

A small `.tar.gz` can expand to gigabytes or to millions of files; checking each member's
header before its data is read (or written) stops that at the first member over budget,
without decompressing the rest. The server scans an upload with `scan_tar`; the agent
charges an `ExtractBudget` as it extracts.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Mapping
from typing import IO

from dstack.core.env_numbers import whole_number

DEFAULT_MAX_EXTRACTED_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_FILES = 50_000


class ArchiveTooLarge(ValueError):
    """The archive holds more data or more members than allowed."""


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):g} MiB"


class ExtractBudget:
    """What an archive may still hold: `max_bytes` of file data and `max_files` members."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_EXTRACTED_BYTES, max_files: int = DEFAULT_MAX_FILES) -> None:
        self.max_bytes, self.max_files = max_bytes, max_files
        self.bytes = self.files = 0

    def admit(self, member: tarfile.TarInfo) -> None:
        """Charge `member` (from its header); `ArchiveTooLarge` when it goes over either limit."""
        self.files += 1
        if self.files > self.max_files:
            raise ArchiveTooLarge(
                f"the code archive has more than {self.max_files} files and directories; "
                "exclude what the run does not need with .gitignore or .dstackignore"
            )
        if member.isfile():
            self.bytes += max(member.size, 0)
            if self.bytes > self.max_bytes:
                raise ArchiveTooLarge(
                    f"the code archive extracts to more than {_mib(self.max_bytes)}; "
                    "exclude large files with .gitignore or .dstackignore"
                )

    @classmethod
    def from_env(cls, prefix: str, environ: Mapping[str, str] | None = None) -> ExtractBudget:
        """Limits from `<prefix>_CODE_EXTRACTED_LIMIT` (bytes) and `<prefix>_CODE_MAX_FILES`."""
        env = os.environ if environ is None else environ
        return cls(
            whole_number(env, f"{prefix}_CODE_EXTRACTED_LIMIT", DEFAULT_MAX_EXTRACTED_BYTES),
            whole_number(env, f"{prefix}_CODE_MAX_FILES", DEFAULT_MAX_FILES),
        )


def scan_tar(fileobj: IO[bytes], budget: ExtractBudget) -> None:
    """Read a (compressed) tar stream through, charging every member to `budget`.

    `ArchiveTooLarge` when over budget; `tarfile.TarError`/`OSError`/`EOFError` when it is not
    a readable tar archive.
    """
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            budget.admit(member)
