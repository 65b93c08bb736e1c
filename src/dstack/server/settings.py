"""Server settings, read from the environment once so every part agrees on paths and URLs."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from dstack.server.limits import ServerLimits


def _home() -> Path:
    return Path(os.environ.get("DSTACK_HOME", str(Path.home() / ".dstack"))).expanduser()


@dataclass
class ServerSettings:
    home: Path = field(default_factory=_home)
    host: str = "127.0.0.1"
    port: int = 3000
    database_url: str | None = None
    code_upload_limit_bytes: int = int(os.environ.get("DSTACK_SERVER_CODE_UPLOAD_LIMIT", str(64 * 1024 * 1024)))
    #: sizes and counts one request or project may ask for (README "Limits"), from DSTACK_SERVER_MAX_* etc.
    limits: ServerLimits = field(default_factory=ServerLimits.from_env)
    # Public URL users reach the server at; defaults to http://host:port.
    public_url: str | None = None

    @property
    def server_dir(self) -> Path:
        return Path(os.environ.get("DSTACK_SERVER_DIR", str(self.home / "server"))).expanduser()

    @property
    def data_dir(self) -> Path:
        return self.server_dir / "data"

    @property
    def encryption_key_file(self) -> Path:
        """The Fernet key(s) that encrypt stored credentials (see `dstack.server.crypto`)."""
        path = os.environ.get("DSTACK_SERVER_ENCRYPTION_KEY_FILE")
        return Path(path).expanduser() if path else self.server_dir / "encryption.key"

    @property
    def metrics_token(self) -> str | None:
        """A token that may read `/metrics` besides admins' (for a Prometheus scraper)."""
        return os.environ.get("DSTACK_SERVER_METRICS_TOKEN") or None

    def resolved_database_url(self) -> str:
        url = self.database_url or os.environ.get("DSTACK_DATABASE_URL")
        if url:
            return _async_driver_url(url)
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


def _async_driver_url(url: str) -> str:
    """Accept plain postgresql:// and sqlite:// URLs and pick the async drivers we ship."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite://"):
        return "sqlite+aiosqlite://" + url.split("://", 1)[1]
    return url
