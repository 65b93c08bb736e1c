"""The user config file: round trip, replacement, defaults, env overrides, permissions."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from dstack.api import config as cfgmod


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DSTACK_HOME", str(tmp_path / "dstack-home"))
    for var in ("DSTACK_PROJECT", "DSTACK_SERVER_URL", "DSTACK_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "dstack-home"


def test_path_and_empty(home: Path) -> None:
    assert cfgmod.config_path() == home / "config.yml"
    assert cfgmod.load_config().projects == []
    assert cfgmod.get_project() is None


def test_add_and_get(home: Path) -> None:
    cfgmod.add_project("main", "http://127.0.0.1:3000/", "tok1")
    cfgmod.add_project("other", "http://h:3000", "tok2", default=False)
    data = yaml.safe_load((home / "config.yml").read_text())
    assert data == {
        "projects": [
            {"name": "main", "url": "http://127.0.0.1:3000", "token": "tok1", "default": True},
            {"name": "other", "url": "http://h:3000", "token": "tok2", "default": False},
        ]
    }
    assert stat.S_IMODE((home / "config.yml").stat().st_mode) == 0o600
    assert cfgmod.get_project().name == "main"
    assert cfgmod.get_project("other").token == "tok2"
    assert cfgmod.get_project("missing") is None


def test_replace_same_name_and_single_default() -> None:
    cfgmod.add_project("a", "http://a", "t1")
    cfgmod.add_project("b", "http://b", "t2")  # becomes the default
    cfgmod.add_project("a", "http://a2", "t3", default=False)
    cfg = cfgmod.load_config()
    assert [p.name for p in cfg.projects] == ["b", "a"]
    assert [p.default for p in cfg.projects] == [True, False]
    assert cfgmod.get_project("a").url == "http://a2"
    assert cfgmod.get_project().name == "b"


def test_only_project_is_default_even_unmarked() -> None:
    cfgmod.add_project("solo", "http://s", "t", default=False)
    assert cfgmod.get_project().name == "solo"


def test_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    cfgmod.add_project("main", "http://m", "tm")
    cfgmod.add_project("dev", "http://d", "td", default=False)
    monkeypatch.setenv("DSTACK_PROJECT", "dev")
    assert cfgmod.get_project().name == "dev"
    assert cfgmod.get_project("main").name == "main"  # an explicit name wins
    monkeypatch.setenv("DSTACK_SERVER_URL", "http://env:1/")
    monkeypatch.setenv("DSTACK_TOKEN", "te")
    p = cfgmod.get_project()
    assert (p.name, p.url, p.token) == ("dev", "http://env:1", "te")
    monkeypatch.delenv("DSTACK_PROJECT")
    assert cfgmod.get_project().name == "main"


def test_malformed_file(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "config.yml").write_text("projects: [\n")
    with pytest.raises(cfgmod.ConfigError, match="config.yml"):
        cfgmod.load_config()
    (home / "config.yml").write_text("projects:\n- name: x\n")
    with pytest.raises(cfgmod.ConfigError, match="malformed"):
        cfgmod.load_config()


def test_atomic_write_leaves_no_temp_files(home: Path) -> None:
    for i in range(5):
        cfgmod.add_project(f"p{i}", "http://x", "t")
    assert sorted(p.name for p in home.iterdir()) == ["config.yml"]
