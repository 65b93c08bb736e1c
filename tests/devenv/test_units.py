"""Fast checks of the dev-environment pieces: the job's commands, the SSH port, the key check at
submission, the ssh config entries, the tunnel URL, and the session bookkeeping behind
`inactivity_duration`."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import asyncssh
import pytest

from dstack.agent.devenv import PORT_BASE, PORT_SPAN, ssh_port
from dstack.agent.devenv_container import KEEPALIVE, READY_LINE, ContainerLauncher, ReadyWatch
from dstack.api import ssh
from dstack.api.tunnel import tunnel_url
from dstack.core.models.configurations import parse_run_configuration
from dstack.server.errors import InvalidRequest
from dstack.server.routers.tunnel import Sessions
from dstack.server.services.jobs import DEVENV_COMMAND, build_job_spec, check_ssh_key


def test_dev_environment_runs_init_then_its_ssh_server() -> None:
    conf = parse_run_configuration({"type": "dev-environment", "init": ["pip install rich", "echo ready"]})
    spec = build_job_spec("dev", conf, 0, 0)
    assert spec.commands == ["pip install rich", "echo ready", DEVENV_COMMAND]
    # with an image: init, then the container says so and stays up (its SSH server runs beside it)
    imaged = parse_run_configuration({"type": "dev-environment", "image": "img", "init": ["echo ready"]})
    assert build_job_spec("dev", imaged, 0, 0).commands == ["echo ready", KEEPALIVE]
    task = parse_run_configuration({"type": "task", "commands": ["echo hi"]})
    assert build_job_spec("t", task, 0, 0).commands == ["echo hi"]


def test_ssh_port_is_stable_and_in_range() -> None:
    ports = {ssh_port(f"job-{i}") for i in range(200)}
    assert all(PORT_BASE <= p < PORT_BASE + PORT_SPAN for p in ports)
    assert ssh_port("job-1") == ssh_port("job-1")
    assert len(ports) > 190  # spread: neighbours on one host rarely collide


def test_submission_needs_a_valid_public_key() -> None:
    dev = parse_run_configuration({"type": "dev-environment"})
    with pytest.raises(InvalidRequest, match="needs ssh_key_pub"):
        check_ssh_key(dev, None)
    with pytest.raises(InvalidRequest, match="not an OpenSSH public key"):
        check_ssh_key(dev, "ssh-rsa not-a-key")
    key = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    check_ssh_key(dev, key)
    check_ssh_key(parse_run_configuration({"type": "task", "commands": ["x"]}), None)  # tasks need none
    check_ssh_key(parse_run_configuration({"type": "dev-environment", "image": "ubuntu"}), key)  # images too


def test_key_is_made_once_and_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSTACK_HOME", str(tmp_path / ".dstack"))
    first = ssh.public_key()
    assert first.startswith("ssh-rsa ")
    assert stat.S_IMODE(os.stat(ssh.key_path()).st_mode) == 0o600
    assert "PRIVATE" not in first
    assert ssh.public_key() == first  # the same key next time


def test_host_entries_replace_each_other_and_include_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSTACK_HOME", str(tmp_path / ".dstack"))
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text("Host old\n    HostName example.com\n")
    config = ssh.write_host("dev-a", "main")
    ssh.write_host("dev-b", "other")
    ssh.write_host("dev-a", "main")
    text = config.read_text()
    assert text.count("Host dev-a\n") == 1 and text.count("Host dev-b\n") == 1
    assert "tunnel --project other dev-b" in text
    assert stat.S_IMODE(os.stat(config).st_mode) == 0o600
    user = (tmp_path / ".ssh" / "config").read_text()
    assert user.startswith(f"Include {config}\n")  # before any Host block, once
    assert user.count("Include") == 1 and "Host old" in user
    ssh.remove_host("dev-a")
    assert "Host dev-a" not in config.read_text() and "Host dev-b" in config.read_text()


def test_tunnel_url() -> None:
    assert tunnel_url("http://h:3000", "main", "dev", None) == "ws://h:3000/api/project/main/runs/dev/tunnel?ssh=1"
    assert tunnel_url("https://h/dstack/", "p", "r", 80) == "wss://h/dstack/api/project/p/runs/r/tunnel?port=80"


def test_sessions_count_open_tunnels() -> None:
    s = Sessions()
    assert s.idle_since("r", 5.0) == 5.0  # never had one: idle since first seen
    s.opened("r")
    s.opened("r")
    s.closed("r")
    assert s.idle_since("r", 5.0) is None  # one still open
    s.closed("r")
    since = s.idle_since("r", 5.0)
    assert since is not None and since > 5.0


def test_ready_line_is_found_across_chunks() -> None:
    watch = ReadyWatch()
    line = (READY_LINE + "\n").encode()
    assert not watch.feed(b"init output\n" + line[:10])
    assert watch.feed(line[10:])
    assert "'" not in READY_LINE  # it is echoed inside single quotes


def test_container_sessions_are_exec_into_the_container() -> None:
    environ = {"PATH": "/usr/bin", "DSTACK_SSH_KEY_PUB": "ssh-ed25519 AAAA", "DSTACK_DEVENV_CONTAINER": "{}"}
    launcher = ContainerLauncher(["podman", "--runtime", "runc"], "ctr", None, environ)
    plain = launcher.argv("echo hi", None)
    assert plain[:5] == ["podman", "--runtime", "runc", "exec", "-i"] and plain[5] == "ctr"
    assert plain[-3:] == ["sh", "-c", "echo hi"]  # bash where the image has it, else sh
    assert launcher.argv(None, "xterm")[5:8] == ["-t", "--env", "TERM=xterm"]
    assert ContainerLauncher(["podman"], "ctr", "bash", environ).argv(None, None)[-2:] == ["/bin/bash", "-i"]
    assert launcher.env(None) == {"PATH": "/usr/bin"}  # the server's own settings are not handed on
    assert not launcher.local_files  # no SFTP/scp of the host's files


def test_inactivity_counts_from_what_the_job_row_keeps() -> None:
    """A restarted server counts from the stored last close (not from its own start), and from its
    own start for a session the previous server's stop cut off."""
    from datetime import UTC, datetime, timedelta

    from dstack.core.models.runs import JobStatus
    from dstack.server.models import JobModel, RunModel
    from dstack.server.routers.tunnel import InactivityWatch

    now = datetime.now(UTC)
    job = JobModel(status=JobStatus.RUNNING, submission_num=0, started_at=now - timedelta(seconds=100))
    run = RunModel(id="r1", jobs=[job])
    watch = InactivityWatch(db=None, app=None, sessions=Sessions())  # type: ignore[arg-type]
    t = now.timestamp()
    assert watch.idle_since(run, t) == job.started_at.timestamp()  # never had a session: since its start
    job.ssh_opened_at, job.ssh_closed_at = now - timedelta(seconds=60), now - timedelta(seconds=40)
    assert watch.idle_since(run, t) == job.ssh_closed_at.timestamp()  # since the stored last close
    job.ssh_opened_at = now - timedelta(seconds=30)  # open when the previous server stopped
    assert watch.idle_since(run, t) == watch.started
    watch.sessions.opened("r1")  # open on this server
    assert watch.idle_since(run, t) is None
    watch.sessions.closed("r1")
    since = watch.idle_since(run, t)
    assert since is not None and abs(since - t) < 5  # just closed
