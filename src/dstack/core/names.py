"""The one naming rule for runs, projects, users and gateways, and bounds for other identifiers.

Names end up in URLs (`/proxy/services/<project>/<run>/`, `/v2/<run>`), host names
(`<run>.<domain>`), file paths and shell environments, so they are kept to a small, safe
alphabet: lowercase letters, digits and `-`, starting with a letter, at most 41 characters.
"""

from __future__ import annotations

import re
from typing import Any

MAX_NAME_LENGTH = 41
NAME_RULE = f"lowercase letters, digits and '-', starting with a letter, at most {MAX_NAME_LENGTH} characters"
_NAME = re.compile(rf"[a-z][a-z0-9-]{{0,{MAX_NAME_LENGTH - 1}}}")

#: repo ids are made by clients from a directory name and a hash; they are only keys
MAX_REPO_ID_LENGTH = 200
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_valid_name(value: Any) -> bool:
    """Whether `value` follows the naming rule (see the module docstring)."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def name_error(kind: str, value: Any) -> str | None:
    """Why `value` is not a valid `kind` name (e.g. "run"), or `None` when it is.

    The message quotes at most the first 50 characters of the value, so a huge name does not
    make a huge error.
    """
    if is_valid_name(value):
        return None
    if not isinstance(value, str):
        return f"invalid {kind} name: expected a string, got {type(value).__name__}"
    shown = value if len(value) <= 50 else value[:50] + "..."
    if len(value) > MAX_NAME_LENGTH:
        return f"invalid {kind} name {shown!r}: longer than {MAX_NAME_LENGTH} characters (use {NAME_RULE})"
    return f"invalid {kind} name {shown!r}: use {NAME_RULE}"


def validate_name(kind: str, value: Any) -> str:
    """Return `value` when it is a valid `kind` name; raise `ValueError` saying why otherwise."""
    problem = name_error(kind, value)
    if problem is not None:
        raise ValueError(problem)
    return str(value)


def repo_id_error(value: Any) -> str | None:
    """Why `value` cannot be a repo id (empty, too long, control characters, slashes), or `None`."""
    if not isinstance(value, str) or not value:
        return "invalid repo id: expected a non-empty string"
    if len(value) > MAX_REPO_ID_LENGTH:
        return f"invalid repo id: longer than {MAX_REPO_ID_LENGTH} characters"
    if _CONTROL.search(value) or "/" in value or "\\" in value or value in (".", ".."):
        return "invalid repo id: it may not contain control characters, '/' or '\\', or be '.' or '..'"
    return None
