"""Archive a working directory into the tar.gz that the server hands to the agent.

The archive honours `.gitignore` and `.dstackignore` files at every level (and the ones above
the directory up to its git root), so what is uploaded is what the user's repo would commit.
It is deterministic — sorted entries, zeroed times and owners — so an unchanged tree hashes to
the same sha256 and the server can skip re-uploading it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dstack.core.errors import DstackError

if TYPE_CHECKING:
    import tarfile

    import pathspec

__all__ = ["CodeTooLargeError", "DEFAULT_MAX_SIZE", "IGNORE_FILES", "ALWAYS_SKIPPED", "archive_code", "list_files"]

DEFAULT_MAX_SIZE = 64 * 1024 * 1024
IGNORE_FILES = (".gitignore", ".dstackignore")
ALWAYS_SKIPPED = frozenset({".git", ".venv", "__pycache__"})


class CodeTooLargeError(DstackError):
    """The archive would exceed the upload limit; the message names the largest files."""

    def __init__(self, message: str, size: int, limit: int, largest: list[tuple[str, int]]) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit
        self.largest = largest


@functools.lru_cache(maxsize=1)
def _pattern_style() -> str:
    """pathspec >= 1.0 calls git's wildmatch style `gitignore` (the old name warns)."""
    import pathspec

    try:
        pathspec.PathSpec.from_lines("gitignore", [])
        return "gitignore"
    except Exception:
        return "gitwildmatch"


@dataclass(frozen=True)
class _Entry:
    rel: str  # posix path relative to the root
    abs: str
    size: int
    mode: int
    link: str | None  # symlink target, else None


@dataclass(frozen=True)
class _Spec:
    """Patterns from one directory; a path is tested as `prefix + rel[len(strip):]`."""

    strip: str
    prefix: str
    spec: pathspec.PathSpec

    def check(self, rel: str) -> bool | None:
        """True: ignored; False: re-included by `!`; None: no pattern matched."""
        return self.spec.check_file(self.prefix + rel[len(self.strip) :]).include


def _read_spec(directory: str) -> pathspec.PathSpec | None:
    lines: list[str] = []
    for name in IGNORE_FILES:  # .dstackignore comes last so it wins over .gitignore
        try:
            with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
                lines.extend(f.read().splitlines())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
            continue
    lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return None
    import pathspec  # imported here: importing dstack.api should not pay for it

    return pathspec.PathSpec.from_lines(_pattern_style(), lines)


def _ancestor_specs(root: Path) -> list[_Spec]:
    """Ignore files between the enclosing git repo's root and `root` (exclusive), outermost first."""
    chain: list[Path] = []
    for parent in root.parents:
        chain.append(parent)
        if (parent / ".git").exists():
            break
    else:
        return []  # not inside a git repo: ancestors' ignore files do not apply
    specs = []
    for parent in reversed(chain):
        spec = _read_spec(str(parent))
        if spec is not None:
            prefix = root.relative_to(parent).as_posix() + "/"
            specs.append(_Spec(strip="", prefix=prefix, spec=spec))
    return specs


def _ignored(specs: list[_Spec], rel: str) -> bool:
    """Git's rule: the deepest ignore file with a matching pattern decides."""
    for spec in reversed(specs):
        verdict = spec.check(rel)
        if verdict is not None:
            return verdict
    return False


def list_files(root: str | Path) -> list[_Entry]:
    """Files and symlinks under `root` that are not ignored, sorted by path."""
    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise DstackError(f"{root} is not a directory")
    out: list[_Entry] = []

    def walk(abs_dir: str, rel_dir: str, specs: list[_Spec]) -> None:
        own = _read_spec(abs_dir)
        if own is not None:
            specs = specs + [_Spec(strip=rel_dir, prefix="", spec=own)]
        try:
            entries = sorted(os.scandir(abs_dir), key=lambda e: e.name)
        except PermissionError:
            return
        for entry in entries:
            if entry.name in ALWAYS_SKIPPED:
                continue
            rel = rel_dir + entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                if not _ignored(specs, rel):
                    out.append(_Entry(rel, entry.path, 0, st.st_mode, os.readlink(entry.path)))
            elif stat.S_ISDIR(st.st_mode):
                if not _ignored(specs, rel + "/"):
                    walk(entry.path, rel + "/", specs)
            elif stat.S_ISREG(st.st_mode):
                if not _ignored(specs, rel):
                    out.append(_Entry(rel, entry.path, st.st_size, st.st_mode, None))

    walk(str(root_path), "", _ancestor_specs(root_path))
    return out


def _too_large(entries: list[_Entry], size: int, limit: int) -> CodeTooLargeError:
    largest = sorted(((e.rel, e.size) for e in entries), key=lambda t: (-t[1], t[0]))[:5]
    lines = "\n".join(f"  {_fmt_size(s):>10}  {p}" for p, s in largest)
    msg = (
        f"the code archive is larger than {_fmt_size(limit)} (at least {_fmt_size(size)} compressed). "
        f"Largest files:\n{lines}\n"
        f"Add what the run does not need to .gitignore or .dstackignore."
    )
    return CodeTooLargeError(msg, size=size, limit=limit, largest=largest)


def _fmt_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def _tarinfo(entry: _Entry) -> tarfile.TarInfo:
    import tarfile

    info = tarfile.TarInfo(entry.rel)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.link is not None:
        info.type = tarfile.SYMTYPE
        info.linkname = entry.link
        info.mode = 0o777
    else:
        info.size = entry.size
        info.mode = 0o755 if entry.mode & 0o111 else 0o644
    return info


class _Guard:
    """A file reader that stops a huge file early once the compressed output passes the limit."""

    def __init__(self, f: io.BufferedReader, size: int, out: io.BytesIO, limit: int, entries: list[_Entry]) -> None:
        self._f, self._left, self._out, self._limit, self._entries = f, size, out, limit, entries

    def read(self, n: int = -1) -> bytes:
        if self._out.tell() > self._limit:
            raise _too_large(self._entries, self._out.tell(), self._limit)
        n = self._left if n < 0 else min(n, self._left)
        data = self._f.read(n)
        if len(data) < n:  # the file shrank while we read it: pad to the size already written
            data += b"\0" * (n - len(data))
        self._left -= len(data)
        return data


def extra_entries(files: list[tuple[str | Path, str]]) -> list[_Entry]:
    """The configuration's `files` (local path, path relative to the repo) as archive entries:
    a directory with its files (its ignore files apply), a single file as itself."""
    out: list[_Entry] = []
    for local, rel in files:
        path = Path(local).expanduser()
        try:
            st = path.stat()
        except OSError as e:
            raise DstackError(f"files: cannot read {local}: {e.strerror}") from e
        prefix = rel.strip("/")
        if stat.S_ISDIR(st.st_mode):
            out += [
                _Entry(f"{prefix}/{e.rel}" if prefix else e.rel, e.abs, e.size, e.mode, e.link)
                for e in list_files(path)
            ]
        elif stat.S_ISREG(st.st_mode) and prefix:
            out.append(_Entry(prefix, str(path), st.st_size, st.st_mode, None))
        else:
            raise DstackError(f"files: {local} is neither a regular file nor a directory")
    return out


def archive_code(
    root: str | Path = ".", max_size: int = DEFAULT_MAX_SIZE, files: list[tuple[str | Path, str]] | None = None
) -> tuple[bytes, str]:
    """Return `(tar.gz bytes, sha256 hex)` of `root`, plus the configuration's `files` at their
    paths (they count against the same limit); raise `CodeTooLargeError` past `max_size`."""
    import gzip
    import tarfile

    entries = list_files(root) + extra_entries(files or [])
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for entry in entries:
                info = _tarinfo(entry)
                if entry.link is not None:
                    tar.addfile(info)
                else:
                    try:
                        f = open(entry.abs, "rb")
                    except OSError:
                        continue  # vanished or unreadable: skip rather than fail the run
                    with f:
                        tar.addfile(info, _Guard(f, entry.size, buf, max_size, entries))
                if buf.tell() > max_size:
                    raise _too_large(entries, buf.tell(), max_size)
    blob = buf.getvalue()
    if len(blob) > max_size:
        raise _too_large(entries, len(blob), max_size)
    return blob, hashlib.sha256(blob).hexdigest()
