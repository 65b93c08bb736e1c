"""`~/.dstack/server/config.yml`: the projects' backends, read at server start and again when
the file changes.

Validated like run configurations (`core.yaml_loader`): any mistake is a `ConfigurationError`
naming the file, the line and the field; the server refuses to start on one rather than run
without a backend the file asks for. A running server re-reads the file when it changes (or on
SIGHUP, `ConfigReloader`); a bad edit is logged with its file, line and field and the
configuration in use stays.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dstack.core.errors import ConfigurationError
from dstack.core.models.configurations import validation_issues

# The YAML loader's bounded parser and pydantic-to-line mapping, shared with run configurations.
from dstack.core.yaml_loader import _check_duplicate_keys, _parse_yaml, _to_configuration_error
from dstack.server.backends.slurm.config import SlurmBackendConfig

logger = logging.getLogger(__name__)

CONFIG_FILE_NAME = "config.yml"
MAX_CONFIG_BYTES = 1024 * 1024

#: every backend type the file may configure (the local and ssh backends need no entry); with a
#: second type this becomes a union chosen by `type` before validation, so error paths stay the
#: file's own (pydantic's discriminated unions put the tag into the path)
AnyBackendConfig = SlurmBackendConfig


class ProjectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=50, pattern=r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
    backends: list[AnyBackendConfig] = Field(default_factory=list, max_length=32)


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    projects: list[ProjectConfig] = Field(default_factory=list, max_length=1000)

    def backends_of(self, project: str) -> list[SlurmBackendConfig]:
        return [b for p in self.projects if p.name == project for b in p.backends]


def load_server_config(server_dir: Path) -> ServerConfig:
    """`server_dir/config.yml`, or an empty configuration when there is none."""
    path = server_dir / CONFIG_FILE_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return ServerConfig()
    except OSError as e:
        raise ConfigurationError(f"{path}: cannot read: {e}", path=str(path)) from e
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigurationError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes", path=str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigurationError(f"{path}: not UTF-8: {e}", path=str(path)) from e
    return parse_server_config(text, str(path))


class ConfigReloader:
    """Notices edits of `config.yml` (its size and mtime) and reads the new version.

    `check()` answers the new configuration once per change, or None: unchanged, or the edit is
    refused (logged with file, line and field; the caller keeps what it runs with)."""

    def __init__(self, server_dir: Path, current: ServerConfig | None = None) -> None:
        self.path = server_dir / CONFIG_FILE_NAME
        self.current = current if current is not None else load_server_config(server_dir)
        self._seen = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def check(self, force: bool = False) -> ServerConfig | None:
        stamp = self._stamp()
        if stamp == self._seen and not force:
            return None
        self._seen = stamp
        try:
            new = load_server_config(self.path.parent)
        except ConfigurationError as e:
            logger.error("%s not applied, the server keeps its previous configuration: %s", self.path, e)
            return None
        if new == self.current:
            return None
        self.current = new
        logger.info("%s changed: configuration applied", self.path)
        return new


def parse_server_config(text: str, source: str = CONFIG_FILE_NAME) -> ServerConfig:
    root, data = _parse_yaml(text, source, source)
    if root is None or data is None:
        return ServerConfig()
    if not isinstance(data, dict):
        line = root.start_mark.line + 1
        raise ConfigurationError(
            f"{source}:{line}: the server configuration must be a mapping (e.g. 'projects: [...]')",
            path=source,
            line=line,
        )
    _check_duplicate_keys(root, source, source)
    _check_project_names(data, root, source)
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as e:
        raise _to_configuration_error(validation_issues(e, ServerConfig), root, source, source) from e


def _check_project_names(data: dict[str, object], root: object, source: str) -> None:
    projects = data.get("projects")
    if not isinstance(projects, list):
        return
    seen: set[str] = set()
    for i, p in enumerate(projects):
        name = p.get("name") if isinstance(p, dict) else None
        if isinstance(name, str):
            if name in seen:
                node = getattr(root, "value", [])
                line = _line_of_project(node, i)
                raise ConfigurationError(
                    f"{source}:{line}: projects[{i}].name: project {name!r} is listed twice",
                    path=source,
                    line=line,
                    field=f"projects[{i}].name",
                )
            seen.add(name)


def _line_of_project(pairs: list[tuple[object, object]], index: int) -> int | None:
    for key, value in pairs:
        if getattr(key, "value", None) == "projects":
            items = getattr(value, "value", [])
            if 0 <= index < len(items):
                return int(items[index].start_mark.line) + 1
    return None
