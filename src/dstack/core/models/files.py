"""dstack's `files:` setting: extra local paths uploaded with the run, placed at a path of the job.

Entries are `local_path[:path]` strings or `{local_path, path}` mappings. The client packs them
into the run's code archive (api/code.py), so they travel, are bounded and are extracted exactly
like the code: the job path must lie inside the repo directory (relative to it, or under
`/workflow`, where image jobs see it). Other absolute job paths are refused by name.
"""

from __future__ import annotations

import posixpath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dstack.core.limits import MAX_PATH

WORKFLOW_DIR = "/workflow"  # the repo directory inside image jobs (agent.containers)
MAX_FILES = 100


class FilePathMapping(BaseModel):
    """One `files:` entry: `local_path` on the client, `path` relative to the job's repo directory."""

    model_config = ConfigDict(extra="forbid")

    local_path: str = Field(min_length=1, max_length=MAX_PATH)
    path: str = Field(min_length=1, max_length=MAX_PATH)


def _job_path(path: str, local: str) -> str:
    if posixpath.isabs(path):
        norm = posixpath.normpath(path)
        if norm != WORKFLOW_DIR and not norm.startswith(WORKFLOW_DIR + "/"):
            raise ValueError(
                f"files: job path {path!r} is outside the repo directory; absolute job paths other than"
                f" under {WORKFLOW_DIR} are not supported yet (give a relative path)"
            )
        rel = norm[len(WORKFLOW_DIR) :].lstrip("/")
    else:
        rel = posixpath.normpath(path)
    if rel in ("", ".") or rel == ".." or rel.startswith("../"):
        raise ValueError(f"files: job path {path!r} must name a path inside the repo directory")
    return rel


def parse_file_mapping(value: Any) -> FilePathMapping:
    if isinstance(value, FilePathMapping):
        return value
    if isinstance(value, dict):
        entry = FilePathMapping.model_validate(value)
        local, path = entry.local_path, entry.path
    elif isinstance(value, str) and value and "\0" not in value:
        local, sep, path = value.partition(":")
        if not local or (sep and not path):
            raise ValueError(f"files: {value!r} must be local_path or local_path:path")
        if not sep:
            norm = posixpath.normpath(local)
            if posixpath.isabs(local) or local.startswith("~") or norm == ".." or norm.startswith("../"):
                raise ValueError(f"files: {local!r} is outside the repo directory; give its job path: {local}:PATH")
            path = norm
    else:
        raise ValueError("files entries are local_path[:path] strings or {local_path, path} mappings")
    return FilePathMapping(local_path=local, path=_job_path(path, local))


def parse_files(value: Any) -> Any:
    """`files:` as a list of `FilePathMapping` (None means none)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError("files must be a list of local_path[:path] entries")
    if len(value) > MAX_FILES:
        raise ValueError(f"files: at most {MAX_FILES} entries")
    return [parse_file_mapping(v) for v in value]
