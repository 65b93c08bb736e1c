"""The server's one settings object: every DSTACK_* variable read when it is built (not at import),
with the same names and defaults as before, and a value it cannot use refused by name."""

import os
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from dstack.server.settings import ServerSettings, SettingsError
from tests.conftest import SRC


def test_defaults(tmp_path: Path) -> None:
    s = ServerSettings(environ={"DSTACK_HOME": str(tmp_path)})
    assert s.home == tmp_path and s.server_dir == tmp_path / "server"
    assert s.encryption_key_file == tmp_path / "server" / "encryption.key"
    assert s.data_dir == tmp_path / "server" / "data"
    assert (s.admin_token, s.metrics_token, s.database_url) == (None, None, None)
    assert s.code_upload_limit_bytes == 64 * 1024 * 1024
    assert (s.agent_check_seconds, s.agent_unreachable_seconds) == (2.0, 60.0)
    assert (s.autoscaler_window_seconds, s.gateway_monitor_interval_seconds) == (60.0, 10.0)
    assert s.limits.max_nodes == 64
    assert s.url == "http://127.0.0.1:3000"
    assert s.resolved_database_url() == f"sqlite+aiosqlite:///{tmp_path / 'server' / 'data' / 'sqlite.db'}"


def test_every_variable_is_read(tmp_path: Path) -> None:
    env = {
        "DSTACK_HOME": str(tmp_path / "home"),
        "DSTACK_SERVER_DIR": str(tmp_path / "srv"),
        "DSTACK_SERVER_ENCRYPTION_KEY_FILE": str(tmp_path / "k"),
        "DSTACK_DATABASE_URL": "postgresql://u:secret-pw@db/dstack",
        "DSTACK_SERVER_ADMIN_TOKEN": "admin-token-value",
        "DSTACK_SERVER_METRICS_TOKEN": "metrics-token-value",
        "DSTACK_SERVER_CODE_UPLOAD_LIMIT": "1024",
        "DSTACK_SERVER_MAX_NODES": "3",
        "DSTACK_SERVER_AGENT_CHECK_SECONDS": "0.5",
        "DSTACK_SERVER_AGENT_UNREACHABLE_SECONDS": "7",
        "DSTACK_SERVER_AUTOSCALER_WINDOW": "4",
        "DSTACK_SERVER_GATEWAY_MONITOR_INTERVAL": "1.5",
    }
    s = ServerSettings(host="0.0.0.0", port=4000, environ=env)
    assert (s.home, s.server_dir, s.encryption_key_file) == (tmp_path / "home", tmp_path / "srv", tmp_path / "k")
    assert s.resolved_database_url() == "postgresql+asyncpg://u:secret-pw@db/dstack"
    assert (s.admin_token, s.metrics_token) == ("admin-token-value", "metrics-token-value")
    assert (s.code_upload_limit_bytes, s.limits.max_nodes) == (1024, 3)
    assert (s.agent_check_seconds, s.agent_unreachable_seconds) == (0.5, 7.0)
    assert (s.autoscaler_window_seconds, s.gateway_monitor_interval_seconds) == (4.0, 1.5)
    assert s.url == "http://127.0.0.1:4000"
    # an explicit database URL wins over the environment's
    assert (
        ServerSettings(database_url="sqlite:///x.db", environ=env).resolved_database_url() == "sqlite+aiosqlite:///x.db"
    )
    # credentials never show in a log line that prints the settings
    assert not any(secret in repr(s) for secret in ("secret-pw", "admin-token-value", "metrics-token-value"))


def test_read_when_built_and_frozen(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DSTACK_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("DSTACK_SERVER_AUTOSCALER_WINDOW", "5")
    first = ServerSettings()
    monkeypatch.setenv("DSTACK_HOME", str(tmp_path / "b"))
    monkeypatch.setenv("DSTACK_SERVER_AUTOSCALER_WINDOW", "6")
    assert (first.home, first.autoscaler_window_seconds) == (tmp_path / "a", 5.0)  # kept what it read
    assert (ServerSettings().home, ServerSettings().autoscaler_window_seconds) == (tmp_path / "b", 6.0)
    with pytest.raises(FrozenInstanceError):
        first.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("DSTACK_SERVER_CODE_UPLOAD_LIMIT", "64MB", "whole number"),
        ("DSTACK_SERVER_CODE_UPLOAD_LIMIT", "0", "at least 1"),
        ("DSTACK_SERVER_AGENT_CHECK_SECONDS", "0", "between"),
        ("DSTACK_SERVER_AGENT_CHECK_SECONDS", "nan", "between"),
        ("DSTACK_SERVER_AGENT_UNREACHABLE_SECONDS", "-1", "between"),
        ("DSTACK_SERVER_AUTOSCALER_WINDOW", "soon", "number of seconds"),
        ("DSTACK_SERVER_GATEWAY_MONITOR_INTERVAL", "1e9", "between"),
        ("DSTACK_SERVER_MAX_REPLICAS", "many", "whole number"),
    ],
)
def test_unusable_values_are_refused_by_name(name: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as e:
        ServerSettings(environ={name: value})
    assert name in str(e.value) and says in str(e.value)


@pytest.mark.slow  # starts the CLI in a subprocess
def test_server_start_refuses_a_bad_variable_clearly(tmp_path: Path) -> None:
    env = dict(os.environ, DSTACK_HOME=str(tmp_path), PYTHONPATH=SRC, DSTACK_SERVER_AGENT_CHECK_SECONDS="often")
    proc = subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", "server", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "DSTACK_SERVER_AGENT_CHECK_SECONDS must be a number of seconds, not 'often'" in proc.stderr
    assert "Traceback" not in proc.stderr
