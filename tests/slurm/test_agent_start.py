"""The agent's cold start as a Slurm allocation runs it: `--announce-early` writes `agent.json` as
soon as the socket listens, and a request made at once waits for the app instead of failing; the
agent's start imports nothing only a dev environment's session server needs (asyncssh)."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dstack.core.daemon import child_pythonpath
from dstack.server.backends.slurm.jobs import batch_script


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": child_pythonpath()}


def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        assert proc.poll() is None, f"the agent exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"no {path} within {timeout} s"
        time.sleep(0.005)


def test_announced_early_agent_answers_the_first_request(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("early-token")
    token_file.chmod(0o600)
    home = tmp_path / "home"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dstack.agent", "--port", "0", "--home", str(home)]
        + ["--token-file", str(token_file), "--announce-early"],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_file(home / "agent.json", proc)
        info = json.loads((home / "agent.json").read_text())
        assert info["pid"] == proc.pid and info["token"] == "early-token"
        assert (home / "agent.json").stat().st_mode & 0o077 == 0
        # Straight away, as the server does: the request waits in the backlog until the app serves.
        conn = http.client.HTTPConnection("127.0.0.1", info["port"], timeout=60)
        conn.request("GET", "/api/host", headers={"Authorization": "Bearer early-token"})
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 200, body
        assert body["cpus"] == os.cpu_count()  # the app's own answer about this host
        conn.request("GET", "/api/host", headers={"Authorization": "Bearer wrong"})
        r = conn.getresponse()
        r.read()
        assert r.status == 403
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_agent_start_does_not_import_the_session_server() -> None:
    code = (
        "import sys, dstack.agent.__main__, dstack.agent.app; "
        "print(sorted(m for m in sys.modules if m.startswith('asyncssh')))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    # the session server still has it where it runs
    code = "import dstack.agent.devenv as d; print(d._server_class().__mro__[1].__module__)"
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("asyncssh")


def test_batch_script_announces_early() -> None:
    for nodes in (1, 2):
        script = batch_script("/usr/bin/python3", "/src", "/shared/jobs/x/home", "/shared/jobs/x/token", nodes=nodes)
        assert "-m dstack.agent --host 0.0.0.0 --port 0 --announce-early" in script
