"""The user's client config, `~/.dstack/config.yml`: which servers and projects the CLI talks to.

Kept in one small YAML file so `dstack server` can write it on first start and the CLI and the
Python API work without flags. Environment variables override it for scripts and CI:
`DSTACK_PROJECT` picks a project, `DSTACK_SERVER_URL` + `DSTACK_TOKEN` replace the file entirely.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from dstack.core.errors import DstackError
from dstack.core.private import private_dir

__all__ = [
    "ConfigError",
    "ProjectConfig",
    "UserConfig",
    "dstack_home",
    "config_path",
    "load_config",
    "save_config",
    "add_project",
    "get_project",
]


class ConfigError(DstackError):
    """`config.yml` exists but cannot be read or is malformed."""


@dataclass
class ProjectConfig:
    """One project on one server, with the token of the user that talks to it.

    Plain dataclasses, not pydantic: every CLI command reads this file, and `dstack ps` must
    not pay for importing pydantic."""

    name: str
    url: str
    token: str
    default: bool = False


@dataclass
class UserConfig:
    projects: list[ProjectConfig] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> UserConfig:
        projects = data.get("projects") or []
        if not isinstance(projects, list):
            raise ValueError("`projects` must be a list")
        out = []
        for i, p in enumerate(projects):
            if not isinstance(p, dict):
                raise ValueError(f"projects[{i}] must be a mapping")
            for key in ("name", "url", "token"):
                if not isinstance(p.get(key), str) or not p[key]:
                    raise ValueError(f"projects[{i}].{key} must be a non-empty string")
            unknown = set(p) - {"name", "url", "token", "default"}
            if unknown:
                raise ValueError(f"projects[{i}]: unknown field {sorted(unknown)[0]!r}")
            out.append(
                ProjectConfig(name=p["name"], url=p["url"], token=p["token"], default=bool(p.get("default", False)))
            )
        return cls(projects=out)

    def get(self, name: str) -> ProjectConfig | None:
        return next((p for p in self.projects if p.name == name), None)

    def default_project(self) -> ProjectConfig | None:
        """The project marked `default`, else the only one there is."""
        marked = next((p for p in self.projects if p.default), None)
        if marked is not None:
            return marked
        return self.projects[0] if len(self.projects) == 1 else None


def dstack_home() -> Path:
    """`$DSTACK_HOME`, else `~/.dstack`; shared with the server, which keeps its data beneath."""
    env = os.environ.get("DSTACK_HOME")
    return Path(env).expanduser() if env else Path.home() / ".dstack"


def config_path() -> Path:
    return dstack_home() / "config.yml"


def load_config() -> UserConfig:
    """The config file's contents; an empty config when the file does not exist."""
    path = config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return UserConfig()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a `projects` list")
    try:
        return UserConfig.from_dict(data)
    except ValueError as e:
        raise ConfigError(f"{path} is malformed: {e}") from e


def save_config(cfg: UserConfig) -> None:
    """Write atomically (temp file + rename) with mode 0600: the file holds tokens."""
    path = config_path()
    private_dir(path.parent)  # 0700: the server's files live below it too
    data = asdict(cfg)
    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".yml.tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def add_project(name: str, url: str, token: str, default: bool = True) -> ProjectConfig:
    """Add or replace the project called `name`; with `default`, it becomes the only default."""
    cfg = load_config()
    project = ProjectConfig(name=name, url=url.rstrip("/"), token=token, default=default)
    projects = [p for p in cfg.projects if p.name != name]
    if default:
        projects = [replace(p, default=False) for p in projects]
    projects.append(project)
    save_config(UserConfig(projects=projects))
    return project


def get_project(name: str | None = None) -> ProjectConfig | None:
    """The project to use: `name`, else `$DSTACK_PROJECT`, else the default one.

    With `$DSTACK_SERVER_URL` and `$DSTACK_TOKEN` both set the file is not consulted; the project
    name then comes from `name`, `$DSTACK_PROJECT`, or `main`.
    """
    wanted = name or os.environ.get("DSTACK_PROJECT") or None
    env_url = os.environ.get("DSTACK_SERVER_URL")
    env_token = os.environ.get("DSTACK_TOKEN")
    if env_url and env_token:
        return ProjectConfig(name=wanted or "main", url=env_url.rstrip("/"), token=env_token, default=True)
    cfg = load_config()
    if wanted is not None:
        return cfg.get(wanted)
    return cfg.default_project()
