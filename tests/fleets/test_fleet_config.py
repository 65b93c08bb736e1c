"""`type: fleet` through the YAML loader: dstack's shape, defaults, and errors with file/line/field."""

import pytest

from dstack.core.errors import ConfigurationError
from dstack.core.models.fleets import FleetConfiguration
from dstack.core.yaml_loader import load_configuration_text

GOOD = """\
type: fleet
name: my-fleet
placement: cluster
ssh_config:
  user: ubuntu
  identity_file: ~/.ssh/id_rsa
  proxy_jump:
    hostname: bastion.example.com
    user: jump
  hosts:
    - 10.0.0.1
    - hostname: 10.0.0.2
      port: 2222
      user: admin
      internal_ip: 192.168.0.2
env:
  A: "1"
resources:
  gpu: 0..
"""


def test_fleet_shape_and_defaults():
    conf = load_configuration_text(GOOD, path="fleet.dstack.yml")
    assert isinstance(conf, FleetConfiguration)
    assert conf.name == "my-fleet" and conf.placement == "cluster" and conf.env == {"A": "1"}
    assert conf.ssh_config is not None
    first, second = conf.ssh_config.resolved_hosts()
    assert (first.hostname, first.user, first.port, first.identity_file) == ("10.0.0.1", "ubuntu", 22, "~/.ssh/id_rsa")
    assert (second.user, second.port, second.internal_ip) == ("admin", 2222, "192.168.0.2")
    assert first.proxy_jump is not None and first.proxy_jump.hostname == "bastion.example.com"


@pytest.mark.parametrize(
    ("text", "line", "field", "words"),
    [
        (
            "type: fleet\nname: f\nssh_config:\n  hosts:\n    - hostname: a\n      prot: 22\n",
            6,
            "ssh_config.hosts[0].prot",
            "port",
        ),
        ("type: fleet\nname: f\nplacement: spread\nssh_config:\n  hosts: [a]\n", 3, "placement", "cluster"),
        ("type: fleet\nname: f\nssh_config:\n  port: 70000\n  hosts: [a]\n", 4, "ssh_config.port", "65535"),
        ("type: fleet\nname: f\nssh_config:\n  hosts: []\n", 4, "ssh_config.hosts", "at least 1"),
        ("type: fleet\nname: f\nssh_config:\n  hosts: [a, b, a]\n", 4, "ssh_config.hosts[2]", "listed twice"),
        ("type: fleet\nname: Bad_Name!\nssh_config:\n  hosts: [a]\n", 2, "name", "fleet name"),
        ("type: fleet\nname: f\nssh_config:\n  hosts: ['a b']\n", 4, "ssh_config.hosts[0].hostname", "hostname"),
        ("type: fleet\nname: f\n", None, None, "ssh_config is required"),
    ],
)
def test_fleet_errors_name_file_line_field(text, line, field, words):
    with pytest.raises(ConfigurationError) as info:
        load_configuration_text(text, path="fleet.dstack.yml")
    e = info.value
    assert "fleet.dstack.yml" in str(e)
    assert words in str(e)
    if line is not None:
        assert e.line == line, str(e)
        assert e.field == field, str(e)
