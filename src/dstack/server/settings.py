"""Server settings: every `DSTACK_*` variable the server honours, read once, when it starts.

`ServerSettings(...)` reads the environment when it is built (at `dstack server` start, or at the
start of a server command such as `dstack server rekey`), never at import, and is frozen after:
every part gets its values from this one object (`app.state.settings`, or passed to its
constructor), so all parts agree and a test's subprocess environment is all it takes to change
one. A value that cannot be used stops the start with the variable's name and what it must be.
"""

import os
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from pathlib import Path

from dstack.core.env_numbers import number, whole_number
from dstack.server.limits import ServerLimits

DEFAULT_CODE_UPLOAD_LIMIT = 64 * 1024 * 1024


class SettingsError(ValueError):
    """An environment variable the server cannot use: names it and says what it must be."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 3000
    #: public URL users reach the server at; defaults to http://host:port
    public_url: str | None = None
    #: given explicitly, else DSTACK_DATABASE_URL, else SQLite under `data_dir`
    database_url: str | None = field(default=None, repr=False)  # may hold a password
    #: where to read from (default: `os.environ`); tests pass a dict
    environ: InitVar[Mapping[str, str] | None] = None

    #: DSTACK_HOME (default ~/.dstack)
    home: Path = field(init=False)
    #: DSTACK_SERVER_DIR (default <home>/server): database, keys, agents' and gateways' state
    server_dir: Path = field(init=False)
    #: DSTACK_SERVER_ENCRYPTION_KEY_FILE: the Fernet key(s) that encrypt stored credentials (`dstack.server.crypto`)
    encryption_key_file: Path = field(init=False)
    #: DSTACK_SERVER_ADMIN_TOKEN: the admin's token, set or reset at start (`bootstrap.ensure_admin`)
    admin_token: str | None = field(init=False, repr=False)
    #: DSTACK_SERVER_METRICS_TOKEN: a token that may read `/metrics` besides admins' (a Prometheus scraper)
    metrics_token: str | None = field(init=False, repr=False)
    #: DSTACK_SERVER_CODE_UPLOAD_LIMIT: the largest code archive `repos/upload_code` takes
    code_upload_limit_bytes: int = field(init=False)
    #: sizes and counts one request or project may ask for (README "Limits"), from DSTACK_SERVER_MAX_* etc.
    limits: ServerLimits = field(init=False)
    #: DSTACK_SERVER_AGENT_CHECK_SECONDS: how often the instance supervisor asks each agent's healthcheck
    agent_check_seconds: float = field(init=False)
    #: DSTACK_SERVER_AGENT_UNREACHABLE_SECONDS: how long jobs wait for an agent being brought back
    agent_unreachable_seconds: float = field(init=False)
    #: DSTACK_SERVER_AUTOSCALER_WINDOW: the request-rate window services scale on
    autoscaler_window_seconds: float = field(init=False)
    #: DSTACK_SERVER_GATEWAY_MONITOR_INTERVAL: how often gateway processes are checked
    gateway_monitor_interval_seconds: float = field(init=False)
    #: DSTACK_SERVER_METRICS_INTERVAL: how often job usage samples are pulled from the agents
    metrics_interval_seconds: float = field(init=False)
    #: DSTACK_SERVER_METRICS_RETENTION_SECONDS: how long stored job usage samples are kept
    metrics_retention_seconds: float = field(init=False)
    #: DSTACK_SERVER_SSH_PORT: where the SSH entry for dstack's official client listens (on `host`,
    #: `dstack.server.ssh_entry`); unset: a free port chosen at start (0 here); `off`: no SSH entry
    ssh_port: int | None = field(init=False)

    def __post_init__(self, environ: Mapping[str, str] | None) -> None:
        env = os.environ if environ is None else environ
        home = Path(env.get("DSTACK_HOME", str(Path.home() / ".dstack"))).expanduser()
        server_dir = Path(env.get("DSTACK_SERVER_DIR", str(home / "server"))).expanduser()
        key_file = env.get("DSTACK_SERVER_ENCRYPTION_KEY_FILE")
        values = {
            "home": home,
            "server_dir": server_dir,
            "encryption_key_file": Path(key_file).expanduser() if key_file else server_dir / "encryption.key",
            "database_url": self.database_url or env.get("DSTACK_DATABASE_URL") or None,
            "admin_token": env.get("DSTACK_SERVER_ADMIN_TOKEN") or None,
            "metrics_token": env.get("DSTACK_SERVER_METRICS_TOKEN") or None,
            "code_upload_limit_bytes": _whole(env, "DSTACK_SERVER_CODE_UPLOAD_LIMIT", DEFAULT_CODE_UPLOAD_LIMIT),
            "limits": _limits(env),
            "agent_check_seconds": _seconds(env, "DSTACK_SERVER_AGENT_CHECK_SECONDS", 2, low=0.01, high=3600),
            "agent_unreachable_seconds": _seconds(env, "DSTACK_SERVER_AGENT_UNREACHABLE_SECONDS", 60, 0, 7 * 86400),
            "autoscaler_window_seconds": _seconds(env, "DSTACK_SERVER_AUTOSCALER_WINDOW", 60, 0.1, 86400),
            "gateway_monitor_interval_seconds": _seconds(env, "DSTACK_SERVER_GATEWAY_MONITOR_INTERVAL", 10, 0.01, 3600),
            "metrics_interval_seconds": _seconds(env, "DSTACK_SERVER_METRICS_INTERVAL", 2, 0.2, 600),
            "metrics_retention_seconds": _seconds(env, "DSTACK_SERVER_METRICS_RETENTION_SECONDS", 3600, 10, 90 * 86400),
            "ssh_port": _ssh_port(env),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    @property
    def data_dir(self) -> Path:
        return self.server_dir / "data"

    def resolved_database_url(self) -> str:
        if self.database_url:
            return _async_driver_url(self.database_url)
        from dstack.core.private import private_dir, touch_private

        private_dir(self.server_dir)
        private_dir(self.data_dir)
        # SQLite gives the -wal and -shm files the main file's mode: create it 0600 first
        # (and tighten the files an older server left).
        db_file = self.data_dir / "sqlite.db"
        for path in (db_file, db_file.with_name("sqlite.db-wal"), db_file.with_name("sqlite.db-shm")):
            if path == db_file or path.exists():
                touch_private(path)
        return f"sqlite+aiosqlite:///{self.data_dir / 'sqlite.db'}"

    @property
    def url(self) -> str:
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


def _limits(env: Mapping[str, str]) -> ServerLimits:
    try:
        return ServerLimits.from_env(env)
    except ValueError as e:  # names the variable already
        raise SettingsError(str(e)) from None


def _whole(env: Mapping[str, str], name: str, default: int) -> int:
    try:
        return whole_number(env, name, default, unit="bytes")
    except ValueError as e:  # names the variable
        raise SettingsError(str(e)) from None


def _seconds(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    try:
        return number(env, name, default, low, high, unit="seconds")
    except ValueError as e:  # names the variable
        raise SettingsError(str(e)) from None


def _port(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise SettingsError(f"{name} must be a TCP port (1-65535), got {raw[:20]!r}")
    return int(raw)


def _ssh_port(env: Mapping[str, str]) -> int | None:
    """The SSH entry is on by default (a free port), so dstack's official client can attach to a
    server started with no settings; `off` leaves no SSH listener at all."""
    if env.get("DSTACK_SERVER_SSH_PORT", "").strip().lower() == "off":
        return None
    return _port(env, "DSTACK_SERVER_SSH_PORT") or 0


def _async_driver_url(url: str) -> str:
    """Accept plain postgresql:// and sqlite:// URLs and pick the async drivers we ship."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url.split("://", 1)[1]
    return url
