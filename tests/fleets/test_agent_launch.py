"""How the agent is started on a fleet host, without hosts: which way is chosen (a systemd unit
where systemd runs and the SSH user is root, `setsid nohup` elsewhere), and the one shell command
that unpacks the bundle, stores the token, stops an older agent, starts the new one and waits
for it, run for real here with `sh` on a stand-in agent (a small `dstack.agent` package in a real
bundle archive). The systemd branch runs with stand-in `systemd-run`/`systemctl` commands on
PATH: one that fails (the agent must still start, with `setsid`) and one that starts the command
it is given as systemd-run would (its options honoured). The namespaced test hosts have no
systemd, so the `setsid` path is the one the end-to-end fleet tests cover."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest

from dstack.server.backends.ssh.agent import launch_script, use_systemd
from dstack.server.backends.ssh.bundle import AgentBundle, _bundle_of
from dstack.server.backends.ssh.probe import parse_probe
from tests.util import wait_for

TOKEN = "t0ken-" + "x" * 20

#: a stand-in agent: writes agent.json as the real one does once it listens, then stays up
FAKE_AGENT = textwrap.dedent(
    """
    import argparse, json, os, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--host"); p.add_argument("--port"); p.add_argument("--home"); p.add_argument("--token-file")
    a = p.parse_args()
    if os.environ.get("FAKE_AGENT_FAIL"):
        print("boom: the agent cannot start", file=sys.stderr)
        sys.exit(1)
    os.makedirs(a.home, exist_ok=True)
    token = open(a.token_file).read().strip()
    with open(os.path.join(a.home, "seen.json"), "w") as f:
        json.dump({"cwd": os.getcwd(), "pythonpath": os.environ.get("PYTHONPATH"), "sid": os.getsid(0)}, f)
    tmp = os.path.join(a.home, ".agent.json.tmp")
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "port": 4242, "token": token}, f)
    os.replace(tmp, os.path.join(a.home, "agent.json"))
    time.sleep(120)
    """
)


def _fake_bundle() -> AgentBundle:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, text in (
            ("dstack/__init__.py", ""),
            ("dstack/agent/__init__.py", ""),
            ("dstack/agent/__main__.py", FAKE_AGENT),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return _bundle_of(buf.getvalue())


@pytest.fixture
def host(tmp_path):
    """An agent folder as `ship_bundle` leaves it (the archive uploaded), and the pids to kill."""
    base = tmp_path / "agent"
    (base / "bundles").mkdir(parents=True)
    bundle = _fake_bundle()
    (base / "bundles" / f"{bundle.name}.tar.gz").write_bytes(bundle.data)
    pids: list[int] = []
    yield base, bundle, pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run(base: Path, bundle: AgentBundle, systemd: bool = False, path_dir: Path | None = None, **env: str):
    script = launch_script(str(base), bundle, sys.executable, "dstack-agent", systemd, timeout=60)
    full_env = dict(os.environ, **env)
    if path_dir is not None:
        full_env["PATH"] = f"{path_dir}:{full_env['PATH']}"
    # generous: the script ends by itself once the agent is up or has exited
    return subprocess.run(
        ["sh", "-c", script], input=TOKEN, capture_output=True, text=True, timeout=40, env=full_env, cwd="/"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not an agent
        return f.read().split(") ", 1)[1][0] != "Z"


def _stub(dir_: Path, name: str, body: str) -> None:
    path = dir_ / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_systemd_is_used_only_where_it_runs_and_the_user_is_root():
    assert use_systemd(parse_probe("systemd=1\nuid=0\n"))
    assert not use_systemd(parse_probe("systemd=1\nuid=1000\n"))  # the system manager needs root
    assert not use_systemd(parse_probe("uid=0\n"))  # no systemd there
    assert not use_systemd(parse_probe("systemd=1\n"))  # uid unknown: not assumed root


def test_the_command_names_the_unit_only_for_systemd(host):
    base, bundle, _ = host
    unit = launch_script(str(base), bundle, "/usr/bin/python3.11", "dstack-agent", True, 60)
    assert "systemd-run --quiet --unit=dstack-agent --property=KillMode=process" in unit
    assert f"--setenv=PYTHONPATH={base}/bundles/{bundle.name}" in unit
    assert "setsid nohup" in unit  # the fallback when systemd-run fails
    plain = launch_script(str(base), bundle, "/usr/bin/python3.11", "dstack-agent", False, 60)
    assert "systemd" not in plain and "setsid nohup" in plain
    assert TOKEN not in unit + plain  # the token goes through stdin, never a command line


def test_setsid_start_unpacks_stores_the_token_and_waits_for_the_agent(host):
    base, bundle, pids = host
    r = _run(base, bundle)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    pids.append(info["pid"])
    assert info["token"] == TOKEN and info["port"] == 4242 and _alive(info["pid"])
    target = base / "bundles" / bundle.name
    assert (target / ".complete").exists() and not (base / "bundles" / f"{bundle.name}.tar.gz").exists()
    assert (base / "token").read_text() == TOKEN and (base / "token").stat().st_mode & 0o777 == 0o600
    seen = json.loads((base / "home" / "seen.json").read_text())
    assert seen["pythonpath"] == str(target) and seen["cwd"] == str(base)
    assert seen["sid"] == info["pid"]  # its own session: it outlives the SSH session that started it

    # again, with the bundle already unpacked: the running agent (another token's) is stopped
    r2 = _run(base, bundle)
    assert r2.returncode == 0, r2.stderr
    pids.append(json.loads(r2.stdout)["pid"])
    assert json.loads(r2.stdout)["pid"] != info["pid"]
    wait_for(lambda: _alive(info["pid"]), lambda alive: not alive, timeout=10, interval=0.05)  # the older agent stops


def test_an_agent_that_exits_is_reported_with_its_log(host):
    base, bundle, _ = host
    r = _run(base, bundle, FAKE_AGENT_FAIL="1")
    assert r.returncode == 3
    assert "the agent did not start" in r.stderr and "boom: the agent cannot start" in r.stderr


def test_systemd_run_failing_falls_back_to_setsid(host, tmp_path):
    base, bundle, pids = host
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    _stub(stubs, "systemctl", "exit 0\n")
    _stub(stubs, "systemd-run", 'echo "Failed to connect to bus" >&2; exit 1\n')
    r = _run(base, bundle, systemd=True, path_dir=stubs)
    assert r.returncode == 0, r.stderr
    pids.append(json.loads(r.stdout)["pid"])
    assert "systemd-run failed: starting the agent with setsid instead" in (base / "agent.log").read_text()


def test_systemd_run_gets_a_unit_that_starts_the_agent(host, tmp_path):
    base, bundle, pids = host
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    calls = tmp_path / "calls"
    _stub(stubs, "systemctl", f'echo "systemctl $*" >> {calls}\n')
    # as systemd-run: the options applied, then the command started outside the caller's session
    _stub(
        stubs,
        "systemd-run",
        f'echo "systemd-run $*" >> {calls}\n'
        'for a; do case "$a" in\n'
        '  --setenv=*) export "${a#--setenv=}";;\n'
        '  --working-directory=*) cd "${a#--working-directory=}" || exit 1;;\n'
        "  --*) ;;\n"
        "  *) break;;\n"
        "esac; shift; done\n"
        'setsid "$@" > /dev/null 2>&1 < /dev/null &\n',
    )
    r = _run(base, bundle, systemd=True, path_dir=stubs)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    pids.append(info["pid"])
    log = calls.read_text()
    assert "systemctl stop dstack-agent" in log
    assert "systemd-run --quiet --unit=dstack-agent --property=KillMode=process" in log
    assert "setsid instead" not in (base / "agent.log").read_text()
    seen = json.loads((base / "home" / "seen.json").read_text())
    assert seen["pythonpath"] == str(base / "bundles" / bundle.name) and seen["cwd"] == str(base)
