"""`~/.dstack/server/config.yml`: Slurm backends are read, mistakes are refused with file, line, field."""

from pathlib import Path

import pytest

from dstack.core.errors import ConfigurationError
from dstack.server.config_file import load_server_config, parse_server_config

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
"""


def test_reads_a_slurm_backend(tmp_path: Path) -> None:
    (tmp_path / "config.yml").write_text(GOOD)
    cfg = load_server_config(tmp_path)
    (b,) = cfg.backends_of("main")
    assert b.type == "slurm" and b.partitions == ["gpu", "cpu"] and b.account == "ml" and b.qos == "normal"
    assert b.login is not None and (b.login.hostname, b.login.user, b.login.port) == ("login1", "alice", 22)
    assert b.shared_dir == "/shared/dstack"
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
