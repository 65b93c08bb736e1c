"""A dev environment with an `image`: plain `ssh RUN` lands inside the container (its filesystem,
env, working directory and user), `ssh -L` reaches a port the job listens on inside it, `init`
ran first, and `inactivity_duration` stops it as for a host dev environment.

A real server, the CLI as subprocesses with a temporary HOME, OpenSSH's client through the server's
tunnel, podman with the busybox test image (tests/images.py; skipped, saying why, without podman).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.devenv.test_devenv import SRC, _dstack, _name, _popen, _ssh, _status, _stop, _write
from tests.util import free_port, wait_until

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="the OpenSSH client (ssh) is not installed")


@pytest.fixture
def home(server: Any, tmp_path: Path) -> dict[str, str]:
    """The environment of a user whose HOME is a temporary directory, configured for `server`."""
    user_home = tmp_path / "home"
    user_home.mkdir()
    env = dict(server.env)
    env.update({"HOME": str(user_home), "DSTACK_HOME": str(user_home / ".dstack"), "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = SRC
    done = _dstack(env, "config", "--url", server.url, "--project", "main", "--token", server.token)
    assert done.returncode == 0, done.stderr
    return env


@pytest.fixture(scope="module")
def image() -> str:
    from tests.images import ensure_test_image

    return ensure_test_image()  # skips, saying why, without podman


def _config(home: dict[str, str]) -> Path:
    return Path(home["HOME"]) / ".dstack" / "ssh" / "config"


def _start(server: Any, home: dict[str, str], tmp_path: Path, body: str) -> tuple[str, subprocess.Popen[str]]:
    run = _name("devimg")
    path = _write(tmp_path / "repo", f"type: dev-environment\nname: {run}\n{body}")
    (tmp_path / "repo" / "from-repo.txt").write_text("the repo's file\n")
    proc = _popen(home, "apply", "-y", "-f", str(path), cwd=tmp_path / "repo")
    config = _config(home)
    wait_until(lambda: config.exists() and f"Host {run}" in config.read_text(), 180, 0.5, "the ssh host entry")

    def ready() -> bool:
        status = _status(server, run)
        if status in ("terminated", "failed", "done"):
            raise AssertionError(f"{run} is {status}")
        return bool(_ssh(home, run, "true").returncode == 0)

    try:
        wait_until(ready, 120, 0.5, f"the SSH server of {run}")
    except AssertionError as e:  # say why: the job's log and what ssh said
        logs = _dstack(home, "logs", run, timeout=60)
        last = _ssh(home, run, "true")
        _stop(home, proc, run)
        raise AssertionError(f"{e}\njob log:\n{logs.stdout}{logs.stderr}\nssh: {last.stderr}") from None
    return run, proc


def test_ssh_lands_inside_the_container(server: Any, home: dict[str, str], tmp_path: Path, image: str) -> None:
    token = uuid.uuid4().hex
    run, proc = _start(
        server,
        home,
        tmp_path,
        f"image: {image}\nuser: '4321:4321'\nenv:\n  DEVENV_TOKEN: {token}\nworking_dir: sub\n"
        "init:\n  - echo from-init > /tmp/init-marker\n",
    )
    try:
        done = _ssh(
            home,
            run,
            "echo token=$DEVENV_TOKEN; echo pwd=$(pwd); echo id=$(id -u); cat /tmp/init-marker; "
            "cat ../from-repo.txt; ls /bin/busybox; echo key=${DSTACK_SSH_KEY_PUB:-none}; "
            "test -e /usr/bin/podman && echo host-fs || echo container-fs",
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert f"token={token}" in lines  # the job's env, set on the container
        assert "pwd=/workflow/sub" in lines  # its working directory inside the container
        assert "id=4321" in lines  # its user
        assert "from-init" in lines  # `init` ran first
        assert "the repo's file" in lines and "/bin/busybox" in lines  # the container's filesystem, code mounted
        assert "container-fs" in lines
        assert "key=none" in lines  # the SSH server's settings stay outside
        assert _ssh(home, run, "exit 7").returncode == 7
        # a terminal session gets a terminal inside the container
        tty = subprocess.run(
            ["ssh", "-F", str(_config(home)), "-o", "BatchMode=yes", "-tt", run, "tty; echo term=$TERM"],
            env={**home, "TERM": "xterm-256color"},
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert tty.returncode == 0 and "/dev/pts/" in tty.stdout and "term=xterm-256color" in tty.stdout, tty
        # a session's stdin reaches the command
        fed = subprocess.run(
            ["ssh", "-F", str(_config(home)), "-o", "BatchMode=yes", run, "cat > /tmp/fed; wc -c < /tmp/fed"],
            env=home,
            input="x" * 100_000,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert fed.returncode == 0 and fed.stdout.strip() == "100000", fed.stderr
        # SFTP is refused (served beside the container, it would be the host's files)
        sftp = subprocess.run(
            ["sftp", "-F", str(_config(home)), "-o", "BatchMode=yes", "-b", "-", run],
            env=home,
            input="ls /usr/bin\n",
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sftp.returncode != 0 and "podman" not in sftp.stdout, (sftp.stdout, sftp.stderr)
        # a port forward reaches a server listening inside the container
        local = free_port()
        server_cmd = f"echo {token} > /tmp/page.html; httpd -f -p 127.0.0.1:8123 -h /tmp"
        background = subprocess.Popen(
            ["ssh", "-F", str(_config(home)), "-o", "BatchMode=yes", "-L", f"{local}:127.0.0.1:8123", run, server_cmd],
            env=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        try:

            def page() -> str:
                try:
                    with socket.create_connection(("127.0.0.1", local), timeout=5) as s:
                        s.sendall(b"GET /page.html HTTP/1.0\r\n\r\n")
                        s.settimeout(5)
                        data = b""
                        while chunk := s.recv(4096):
                            data += chunk
                        return data.decode(errors="replace")
                except OSError:
                    return ""

            assert token in wait_until(page, 60, 0.5, "the forwarded port to answer")
        finally:
            background.terminate()
            background.communicate(timeout=30)
        assert _status(server, run) == "running"
    finally:
        out = _stop(home, proc, run)
    assert f"vscode://vscode-remote/ssh-remote+{run}/workflow/sub" in out, out  # the container's working dir


def test_inactivity_duration_stops_an_image_dev_environment(
    server: Any, home: dict[str, str], tmp_path: Path, image: str
) -> None:
    run, proc = _start(server, home, tmp_path, f"image: {image}\ninactivity_duration: 8s\n")
    closed_at = time.monotonic()  # the last session (`_wait_ssh`'s) has just closed
    try:
        assert _status(server, run) == "running"
        wait_until(lambda: _status(server, run) == "terminated", 90, 0.5, f"{run} to stop")
        assert time.monotonic() - closed_at >= 7
        job = server.client().runs.get(run).jobs[0].job_submissions[-1]
        assert "inactivity_duration" in (job.termination_reason_message or ""), job
    finally:
        _stop(home, proc, run)
