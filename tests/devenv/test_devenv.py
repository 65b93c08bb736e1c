"""Dev environments entered with the system `ssh`, `dstack attach` forwarding a task's port, and
`inactivity_duration` stopping an unused dev environment.

A real server (tests/conftest.py `server`), the CLI as subprocesses with a temporary HOME (so
`~/.dstack/ssh/config` and `~/.ssh/config` are the test's own), OpenSSH's client through the
server's tunnel (`ProxyCommand dstack tunnel ...`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.util import free_port, wait_until

SRC = str(Path(__file__).resolve().parents[2] / "src")
SMALL = "resources:\n  cpu: 0..\n  memory: 0.5GB..\n  disk: 1GB..\n"

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="the OpenSSH client (ssh) is not installed")


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


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


def _dstack(env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 180) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _popen(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dstack.cli.main", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _ssh(env: dict[str, str], run: str, command: str, timeout: float = 60) -> Any:
    config = Path(env["HOME"]) / ".dstack" / "ssh" / "config"
    return subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", run, command],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _wait_ssh(env: dict[str, str], run: str) -> None:
    """Until the SSH server answers: a job is `running` while its `init` still runs, before it starts."""
    wait_until(lambda: _ssh(env, run, "true").returncode == 0, 120, 0.5, f"the SSH server of {run}")


def _status(server: Any, run: str) -> str:
    return str(server.client().runs.get(run).status.value)


def _write(repo: Path, body: str) -> Path:
    repo.mkdir(exist_ok=True)
    path = repo / ".dstack.yml"
    path.write_text(body + SMALL)
    return path


def _stop_process(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        return str(proc.communicate(timeout=20)[0])
    except subprocess.TimeoutExpired:
        proc.kill()
        return str(proc.communicate()[0])


def _stop(env: dict[str, str], proc: subprocess.Popen[str] | None, run: str) -> str:
    out = _stop_process(proc) if proc is not None else ""
    _dstack(env, "stop", "-y", run, timeout=60)
    return out


def test_ssh_lands_in_the_jobs_environment(server: Any, home: dict[str, str], tmp_path: Path) -> None:
    run = _name("dev")
    token = uuid.uuid4().hex
    repo = tmp_path / "repo"
    path = _write(
        repo,
        f"type: dev-environment\nname: {run}\nide: vscode\nenv:\n  DEVENV_TOKEN: {token}\n"
        "working_dir: sub\ninit:\n  - echo from-init > init-marker\n",
    )
    proc = _popen(home, "apply", "-y", "-f", str(path), cwd=repo)
    config = Path(home["HOME"]) / ".dstack" / "ssh" / "config"
    try:
        wait_until(lambda: config.exists() and f"Host {run}" in config.read_text(), 180, 0.5, "the ssh host entry")
        # `~/.ssh/config` includes dstack's file, once
        user_config = (Path(home["HOME"]) / ".ssh" / "config").read_text()
        assert user_config.count(f"Include {config}") == 1
        # the user's key: the private half stays here, the public half was what the server got
        key = Path(home["DSTACK_HOME"]) / "ssh" / "id_rsa"
        assert key.stat().st_mode & 0o777 == 0o600
        spec = server.client().runs.get(run).run_spec
        assert spec.ssh_key_pub == key.with_name("id_rsa.pub").read_text().strip()
        assert "PRIVATE" not in str(spec.model_dump())

        _wait_ssh(home, run)
        done = _ssh(
            home,
            run,
            "echo token=$DEVENV_TOKEN; echo pwd=$(pwd); cat init-marker; "
            "python -c \"import sys; print('venv=' + str(sys.prefix != sys.base_prefix))\"; "
            "echo key=${DSTACK_SSH_KEY_PUB:-none}",
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert f"token={token}" in lines
        assert any(ln.startswith("pwd=") and ln.endswith("/sub") for ln in lines), lines
        assert "from-init" in lines  # `init` ran first, in the working directory
        assert "venv=True" in lines  # the job's venv is the session's python
        assert "key=none" in lines  # the SSH server's own settings are not handed on
        # an exit status comes back
        assert _ssh(home, run, "exit 7").returncode == 7
        assert _status(server, run) == "running"  # a dev environment stays up until stopped
    finally:
        out = _stop(home, proc, run)
    assert f"vscode://vscode-remote/ssh-remote+{run}/" in out and "/sub" in out, out
    assert f"ssh {run}" in out


def test_attach_forwards_a_tasks_port(server: Any, home: dict[str, str], tmp_path: Path) -> None:
    run = _name("web")
    token = uuid.uuid4().hex
    local = free_port()
    repo = tmp_path / "repo"
    path = _write(
        repo,
        f"type: task\nname: {run}\nports:\n  - {local}:8000\ncommands:\n"
        f"  - echo {token} > index.html\n  - python -m http.server 8000\n",
    )
    done = _dstack(home, "apply", "-y", "-d", "-f", str(path), cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr
    proc = None
    try:
        wait_until(lambda: _status(server, run) == "running", 180, 0.5, f"{run} to run")
        proc = _popen(home, "attach", run)

        def page() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{local}/index.html", timeout=5) as r:
                    return str(r.read().decode())
            except OSError:
                return ""

        assert token in wait_until(page, 120, 0.5, "the forwarded port to answer")
        # the tunnel reaches only the ports the job declares (a host job's address is the host's own)
        other = _dstack(home, "tunnel", "--port", "22", run, timeout=60)
        assert other.returncode != 0 and "port 22 is not one of the run's ports" in other.stderr, other.stderr
    finally:
        out = _stop(home, proc, run)
    assert f"Port 8000 of the job is at localhost:{local}" in out, out


def test_inactivity_duration_stops_an_unused_dev_environment(server: Any, home: dict[str, str], tmp_path: Path) -> None:
    run = _name("idle")
    repo = tmp_path / "repo"
    path = _write(repo, f"type: dev-environment\nname: {run}\ninactivity_duration: 12s\n")
    done = _dstack(home, "apply", "-y", "-d", "-f", str(path), cwd=repo)
    assert done.returncode == 0, done.stdout + done.stderr
    config = Path(home["HOME"]) / ".dstack" / "ssh" / "config"
    try:
        wait_until(lambda: _status(server, run) == "running", 180, 0.5, f"{run} to run")
        attach = _popen(home, "attach", run, "--no-logs")
        wait_until(lambda: config.exists() and f"Host {run}" in config.read_text(), 60, 0.5, "the ssh host entry")
        _wait_ssh(home, run)
        # an open session keeps it up past the limit ...
        held = subprocess.Popen(
            ["ssh", "-F", str(config), "-o", "BatchMode=yes", run, "sleep 16; echo still-here"],
            env=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        _stop_process(attach)
        out, err = held.communicate(timeout=90)
        assert held.returncode == 0 and "still-here" in out, err
        closed_at = time.monotonic()
        assert _status(server, run) == "running"
        # ... and after the last one closed, it stops once the limit has passed
        wait_until(lambda: _status(server, run) == "terminated", 60, 0.5, f"{run} to stop")
        assert time.monotonic() - closed_at >= 10
        job = server.client().runs.get(run).jobs[0].job_submissions[-1]
        assert "inactivity_duration" in (job.termination_reason_message or ""), job
        # a stopped dev environment is refused with a reason, not a bare failure
        refused = _ssh(home, run, "true")
        assert refused.returncode != 0 and "has no running job" in refused.stderr, refused.stderr
    finally:
        _dstack(home, "stop", "-y", run, timeout=60)
