"""The CLI as users run it: `python -m dstack.cli.main ...` subprocesses against a real server.

Uses the `server` fixture from tests/conftest.py (a real `dstack server` on a free port with its
own DSTACK_HOME; `.env` is the environment for subprocesses).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

from tests.util import free_port, wait_until

SRC = str(Path(__file__).resolve().parents[2] / "src")
# Tiny tasks: no dedicated CPU, so earlier tests' detached runs never crowd out later ones on a 2-core host.
SMALL = "resources:\n  cpu: 0..\n  memory: 0.5GB..\n  disk: 1GB..\n"


def _env(server: Any, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(server.env) if server is not None else dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def dstack(
    server: Any, *args: str, cwd: Path | None = None, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", *args],
        env=env or _env(server),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _task(tmp_path: Path, commands: list[str], filename: str = ".dstack.yml") -> Path:
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    (repo / "data.txt").write_text("from-the-repo\n")
    body = "type: task\ncommands:\n" + "".join(f"  - {c!r}\n" for c in commands) + SMALL
    path = repo / filename
    path.write_text(body)
    return path


def _ps_line(server: Any, name: str) -> str:
    out = dstack(server, "ps", "-a").stdout
    return next((ln for ln in out.splitlines() if ln.split() and ln.split()[0] == name), "")


def _wait_status(server: Any, name: str, statuses: tuple[str, ...], timeout: float = 60) -> str:
    last = [""]

    def reached() -> str:
        last[0] = line = _ps_line(server, name)
        return line if any(f" {s} " in f" {line} " for s in statuses) else ""

    try:
        return wait_until(reached, timeout, 0.5, f"{name} to reach {statuses}")
    except AssertionError as e:
        raise AssertionError(f"{e}: {last[0]!r}") from None


def test_task_runs_to_done_with_logs(server: Any, tmp_path: Path) -> None:
    path = _task(tmp_path, ["echo hello-from-task", "cat data.txt"])
    name = _name("ok")
    r = dstack(server, "run", str(path.parent), "-f", str(path), "-y", "-n", name)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for word in ("Configuration", "Project", "Resources", "Spot policy", "Retry"):
        assert word in out
    assert "BACKEND" in out and "PRICE" in out
    assert "hello-from-task" in out
    assert "from-the-repo" in out  # the working dir's code got there
    assert f"Run {name} is done" in out
    assert "done" in _ps_line(server, name)


def test_failing_task_exits_nonzero_and_ps_shows_exit_status(server: Any, tmp_path: Path) -> None:
    path = _task(tmp_path, ["echo before-failure", "exit 3"])
    name = _name("bad")
    r = dstack(server, "apply", "-f", str(path), "-y", "-n", name, cwd=path.parent)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "before-failure" in r.stdout
    assert "exit status 3" in r.stdout
    line = _ps_line(server, name)
    assert "failed" in line and "exit status 3" in line


def test_detach_then_logs(server: Any, tmp_path: Path) -> None:
    path = _task(tmp_path, ["echo line-one", "sleep 1", "echo line-two"])
    name = _name("det")
    r = dstack(server, "run", str(path.parent), "-y", "-d", "-n", name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "line-one" not in r.stdout
    logs = dstack(server, "logs", name, "-f", timeout=120)
    assert logs.returncode == 0, logs.stderr
    assert "line-one" in logs.stdout and "line-two" in logs.stdout
    assert logs.stdout.index("line-one") < logs.stdout.index("line-two")
    _wait_status(server, name, ("done",))
    again = dstack(server, "logs", name)
    assert "line-one\n" in again.stdout


def test_stop_a_running_task(server: Any, tmp_path: Path) -> None:
    path = _task(tmp_path, ["echo started", "sleep 300"])
    name = _name("stop")
    r = dstack(server, "run", str(path.parent), "-y", "-d", "-n", name)
    assert r.returncode == 0, r.stdout + r.stderr
    _wait_status(server, name, ("running",))
    no = dstack(server, "stop", name)  # no terminal and no -y: refuses
    assert no.returncode == 1 and "-y" in no.stderr
    s = dstack(server, "stop", name, "-y", timeout=90)
    assert s.returncode == 0, s.stdout + s.stderr
    assert "terminated" in s.stdout
    assert "terminated" in _ps_line(server, name)


def test_ctrl_c_while_attached_asks_and_stops(server: Any, tmp_path: Path) -> None:
    path = _task(tmp_path, ["for i in $(seq 1 300); do echo tick-$i; sleep 0.2; done"])
    name = _name("intr")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dstack.cli.main", "run", str(path.parent), "-y", "-n", name],
        env=_env(server),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    seen = ""
    deadline = time.monotonic() + 90
    while "tick-2" not in seen and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
    assert "tick-2" in seen, seen
    proc.send_signal(signal.SIGINT)
    proc.stdin.write("y\n")
    proc.stdin.flush()
    rest, _ = proc.communicate(timeout=90)
    assert proc.returncode == 130, seen + rest
    assert "Stop the run before detaching?" in rest
    assert "terminated" in _ps_line(server, name)


def test_ps_default_and_all(server: Any, tmp_path: Path) -> None:
    path = _task(tmp_path, ["echo quick"])
    names = [_name("ps") for _ in range(3)]
    for n in names:
        assert dstack(server, "run", str(path.parent), "-y", "-n", n).returncode == 0
    r = dstack(server, "ps", "-a")
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0].split()
    assert header[:6] == ["NAME", "BACKEND", "RESOURCES", "PRICE", "STATUS", "SUBMITTED"]
    for n in names:
        assert n in r.stdout
    assert dstack(server, "ps").returncode == 0


def test_malformed_yaml_shows_the_line(server: Any, tmp_path: Path) -> None:
    path = tmp_path / "bad.dstack.yml"
    path.write_text(
        textwrap.dedent("""\
        type: task
        commands:
          - echo hi
        resources:
          memory: lots
    """)
    )
    r = dstack(server, "apply", "-f", str(path), "-y")
    assert r.returncode == 1
    assert r.stderr.startswith("Error: ")
    assert "bad.dstack.yml:5" in r.stderr and "memory" in r.stderr


def test_init_and_config_show(server: Any, tmp_path: Path) -> None:
    r = dstack(server, "init", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    c = dstack(server, "config")
    assert c.returncode == 0 and server.url.rstrip("/") in c.stdout


def test_unreachable_server(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    env = _env(None, {"DSTACK_HOME": str(tmp_path / "home"), "DSTACK_SERVER_URL": url, "DSTACK_TOKEN": "x"})
    env.pop("DSTACK_PROJECT", None)
    r = dstack(None, "ps", env=env)
    assert r.returncode == 1
    assert f"Error: cannot reach the dstack server at {url}" in r.stderr
    assert "dstack server" in r.stderr


def test_no_config_at_all(tmp_path: Path) -> None:
    env = _env(None, {"DSTACK_HOME": str(tmp_path / "home")})
    for var in ("DSTACK_SERVER_URL", "DSTACK_TOKEN", "DSTACK_PROJECT"):
        env.pop(var, None)
    r = dstack(None, "ps", env=env)
    assert r.returncode == 1 and "dstack server" in r.stderr
