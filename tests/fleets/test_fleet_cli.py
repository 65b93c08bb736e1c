"""`dstack apply -f fleet.dstack.yml`, `dstack fleet`, `dstack fleet delete NAME [-i N]` as users run
them, against a real server and namespaced SSH hosts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import running_server

pytestmark = pytest.mark.slow
SRC = str(Path(__file__).resolve().parents[2] / "src")


def dstack(srv, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = dict(srv.env)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def _write(path: Path, net, addresses: list[str], name: str = "cli-fleet") -> Path:
    hosts = "".join(f"    - {a}\n" for a in addresses)
    path.write_text(
        f"type: fleet\nname: {name}\nssh_config:\n  user: root\n  identity_file: {net.key}\n  hosts:\n{hosts}"
    )
    return path


def test_fleet_cli(host_net, tmp_path):
    h0, h1 = host_net.hosts[:2]
    with running_server(tmp_path) as srv:
        conf = _write(tmp_path / "fleet.dstack.yml", host_net, [h0.address, h1.address])
        r = dstack(srv, "apply", "-f", str(conf), "-y", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        # the plan named each host with what it probed, then the fleet came up
        assert f"root@{h0.address}:22" in r.stdout and f"root@{h1.address}:22" in r.stdout
        assert "add" in r.stdout and "is ready" in r.stdout

        r = dstack(srv, "fleet", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        lines = [line for line in r.stdout.splitlines() if "ssh (cli-fleet)" in line]
        assert len(lines) == 2 and all("idle" in line for line in lines), r.stdout
        assert {h0.address, h1.address} <= set(r.stdout.split())

        r = dstack(srv, "fleet", "delete", "cli-fleet", "-i", "1", "-y", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        r = dstack(srv, "fleet", "list", cwd=tmp_path)
        assert h0.address in r.stdout and h1.address not in r.stdout

        r = dstack(srv, "fleet", "delete", "cli-fleet", "-y", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "No fleets." in dstack(srv, "fleet", cwd=tmp_path).stdout

        r = dstack(srv, "fleet", "delete", "nope", "-y", cwd=tmp_path)
        assert r.returncode == 1 and "fleet 'nope' not found" in (r.stdout + r.stderr)


def test_unreachable_host_refuses_the_apply(host_net, tmp_path):
    """A host nothing answers on: the plan says why, and nothing is created."""
    h0 = host_net.hosts[0]
    nobody = str(host_net.subnet.network_address + 250)
    with running_server(tmp_path) as srv:
        conf = _write(tmp_path / "fleet.dstack.yml", host_net, [h0.address, nobody], name="half")
        r = dstack(srv, "apply", "-f", str(conf), "-y", cwd=tmp_path, timeout=120)
        assert r.returncode == 1, r.stdout + r.stderr
        assert nobody in r.stdout and ("timed out" in r.stdout or "cannot connect" in r.stdout), r.stdout
        assert "No fleets." in dstack(srv, "fleet", cwd=tmp_path).stdout


def test_bad_fleet_file_names_line_and_field(host_net, tmp_path):
    with running_server(tmp_path) as srv:
        conf = tmp_path / "fleet.dstack.yml"
        conf.write_text("type: fleet\nname: f\nssh_config:\n  hosts:\n    - hostname: a\n      prot: 22\n")
        r = dstack(srv, "apply", "-f", str(conf), "-y", cwd=tmp_path)
        assert r.returncode == 1
        assert "fleet.dstack.yml:6" in r.stderr and "prot" in r.stderr and "port" in r.stderr, r.stderr
