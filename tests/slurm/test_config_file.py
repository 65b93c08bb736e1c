"""`~/.dstack/server/config.yml`: Slurm backends are read, mistakes are refused with file, line, field."""

import logging
import os
from pathlib import Path

import pytest

from dstack.core.errors import ConfigurationError
from dstack.server.backends.slurm.registry import SlurmBackends
from dstack.server.config_file import ConfigReloader, load_server_config, parse_server_config

GOOD = """\
projects:
  - name: main
    backends:
      - type: slurm
        login: {hostname: login1, user: alice, identity_file: ~/.ssh/id_ed25519}
        partitions: [gpu, cpu]
        account: ml
        qos: normal
        shared_dir: /shared/dstack
        server_url: http://10.0.0.5:3000
"""


def test_reads_a_slurm_backend(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text(GOOD)
    cfg = load_server_config(tmp_path)
    (b,) = cfg.backends_of("main")
    assert b.type == "slurm" and b.partitions == ["gpu", "cpu"] and b.account == "ml" and b.qos == "normal"
    assert b.login is not None and (b.login.hostname, b.login.user, b.login.port) == ("login1", "alice", 22)
    assert b.shared_dir == "/shared/dstack" and b.server_url == "http://10.0.0.5:3000"
    assert cfg.backends_of("other") == []


def test_no_file_is_no_backends(tmp_path: Path) -> None:
    assert load_server_config(tmp_path).projects == []


@pytest.mark.parametrize(
    ("text", "line", "field", "words"),
    [
        (
            "projects:\n  - name: main\n    backends:\n      - type: slurm\n        partitons: [gpu]\n",
            5,
            "projects[0].backends[0].partitons",
            "did you mean 'partitions'",
        ),
        ("projects:\n  - name: main\n    backends:\n      - type: aws\n", 4, "projects[0].backends[0].type", "'slurm'"),
        (
            "projects:\n  - name: main\n    backends:\n      - type: slurm\n        qos: 'a; rm -rf /'\n",
            5,
            "projects[0].backends[0].qos",
            "pattern",
        ),
        (
            "projects:\n  - name: main\n    backends:\n      - type: slurm\n        shared_dir: relative/dir\n",
            5,
            "projects[0].backends[0].shared_dir",
            "pattern",
        ),
        (
            "projects:\n  - name: main\n    backends:\n      - type: slurm\n        partitions: ['gpu', 'a b']\n",
            5,
            "projects[0].backends[0].partitions[1]",
            "pattern",
        ),
        (
            "projects:\n  - name: main\n    backends:\n      - type: slurm\n        server_url: 'ftp://x; y'\n",
            5,
            "projects[0].backends[0].server_url",
            "pattern",
        ),
        ("projects:\n  - name: main\n  - name: main\n", 3, "projects[1].name", "listed twice"),
        (
            "projects:\n  - name: main\n    backends:\n      - type: slurm\n        login: {user: alice}\n",
            5,
            "projects[0].backends[0].login.hostname",
            "hostname",
        ),
    ],
)
def test_mistakes_name_file_line_and_field(tmp_path: Path, text: str, line: int, field: str, words: str) -> None:
    (tmp_path / "config.yml").write_text(text)
    with pytest.raises(ConfigurationError) as e:
        load_server_config(tmp_path)
    assert e.value.line == line, str(e.value)
    assert e.value.field == field, str(e.value)
    assert str(e.value).startswith(f"{tmp_path / 'config.yml'}:{line}:"), str(e.value)
    assert words in str(e.value)


def test_not_a_mapping_and_bad_yaml() -> None:
    with pytest.raises(ConfigurationError, match=r"config.yml:1: the server configuration must be a mapping"):
        parse_server_config("[1, 2]\n", "config.yml")
    with pytest.raises(ConfigurationError, match=r"config.yml:2: invalid YAML"):
        parse_server_config("projects: {\n", "config.yml")


def _write(path: Path, text: str) -> None:
    """Write and move the mtime on, so an edit within the filesystem's timestamp granularity shows."""
    path.write_text(text)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_reloader_applies_edits_and_keeps_the_old_config_on_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "config.yml"
    _write(path, GOOD)
    reloader = ConfigReloader(tmp_path)
    assert reloader.check() is None  # unchanged
    _write(path, GOOD.replace("qos: normal", "qos: high"))
    new = reloader.check()
    assert new is not None and new.backends_of("main")[0].qos == "high"
    assert reloader.check() is None  # once per change
    with caplog.at_level(logging.ERROR, logger="dstack.server.config_file"):
        _write(path, GOOD.replace("partitions: [gpu, cpu]", "partitons: [gpu]"))
        assert reloader.check() is None
    assert reloader.current.backends_of("main")[0].qos == "high"  # the previous one stays
    logged = caplog.text
    assert f"{path}:6:" in logged and "projects[0].backends[0].partitons" in logged, logged
    assert "keeps its previous configuration" in logged
    path.unlink()  # no file: no backends
    new = reloader.check()
    assert new is not None and new.projects == []


def test_apply_keeps_unchanged_backends_and_replaces_changed_ones(tmp_path: Path) -> None:
    two = GOOD + "      - type: slurm\n        shared_dir: /shared/two\n        login: {hostname: login2}\n"
    backends = SlurmBackends(parse_server_config(two), tmp_path)
    first, second = backends.by_project["main"]
    backends.apply(parse_server_config(two.replace("/shared/two", "/shared/2")))
    assert backends.by_project["main"][0] is first  # same settings: same backend (its connection)
    assert backends.by_project["main"][1] is not second and backends.by_project["main"][1].dir == "/shared/2"
    backends.apply(parse_server_config("projects: []\n"))
    assert not backends and backends.backend("main", 0) is None
