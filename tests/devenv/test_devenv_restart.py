"""`inactivity_duration` goes on counting across a server restart: the job row keeps when its last
SSH session closed (routers/tunnel.py), so a dev environment left idle stops on time, not a full
`inactivity_duration` after the restarted server came up.

A server of the test's own (killed and started again), a host dev environment, OpenSSH's client.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.devenv.test_devenv import SRC, _dstack, _name, _popen, _ssh, _status, _stop_process, _write
from tests.util import wait_until

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="the OpenSSH client (ssh) is not installed")
LIMIT = 20


def _close_recorded(server: Any, run: str) -> bool:
    """The job row says its last SSH session closed (the server writes it as the tunnel ends)."""
    query = "SELECT j.ssh_opened_at, j.ssh_closed_at FROM jobs j JOIN runs r ON r.id = j.run_id WHERE r.run_name = {}"
    if server.database_url is None:
        with sqlite3.connect(server.home / "server" / "data" / "sqlite.db") as db:
            row = db.execute(query.format("?"), (run,)).fetchone()
    else:
        import asyncpg

        async def fetch() -> Any:
            conn = await asyncpg.connect(server.database_url)
            try:
                return await conn.fetchrow(query.format("$1"), run)
            finally:
                await conn.close()

        row = asyncio.run(fetch())
    return row is not None and row[0] is not None and row[1] is not None and row[1] >= row[0]


def test_idle_count_survives_a_server_restart(fresh_server: Any, tmp_path: Path) -> None:
    server = fresh_server
    user_home = tmp_path / "home"
    user_home.mkdir()
    home = dict(server.env)
    home.update({"HOME": str(user_home), "DSTACK_HOME": str(user_home / ".dstack"), "PYTHONPATH": SRC})
    assert _dstack(home, "config", "--url", server.url, "--project", "main", "--token", server.token).returncode == 0
    run = _name("idle")
    path = _write(tmp_path / "repo", f"type: dev-environment\nname: {run}\ninactivity_duration: {LIMIT}s\n")
    done = _dstack(home, "apply", "-y", "-d", "-f", str(path), cwd=tmp_path / "repo")
    assert done.returncode == 0, done.stdout + done.stderr
    config = user_home / ".dstack" / "ssh" / "config"
    try:
        wait_until(lambda: _status(server, run) == "running", 180, 0.5, f"{run} to run")
        attach = _popen(home, "attach", run, "--no-logs")  # writes the ssh host entry
        wait_until(lambda: config.exists() and f"Host {run}" in config.read_text(), 60, 0.5, "the ssh host entry")
        _stop_process(attach)
        wait_until(lambda: _ssh(home, run, "true").returncode == 0, 120, 0.5, f"the SSH server of {run}")
        closed_at = time.monotonic()  # its last session has just closed ...
        wait_until(
            lambda: _close_recorded(server, run), 30, 0.2, "the session's end on the job row"
        )  # ... and is stored
        server.kill()
        time.sleep(max(0.0, closed_at + LIMIT / 2 - time.monotonic()))  # down for half the limit
        server.start()
        restarted_at = time.monotonic()
        wait_until(lambda: _status(server, run) in ("terminating", "terminated"), 90, 0.5, f"{run} to stop")
        stopped_at = time.monotonic()
        assert stopped_at - closed_at >= LIMIT - 1  # not before the limit
        # counted from the last session, not from the restart (that would be restarted_at + LIMIT)
        assert stopped_at < max(restarted_at, closed_at + LIMIT) + LIMIT / 2, (
            stopped_at - closed_at,
            restarted_at - closed_at,
        )
        job = server.client().runs.get(run).jobs[0].job_submissions[-1]
        wait_until(lambda: _status(server, run) == "terminated", 60, 0.5, f"{run} to be terminated")
        job = server.client().runs.get(run).jobs[0].job_submissions[-1]
        assert "inactivity_duration" in (job.termination_reason_message or ""), job
    finally:
        _dstack(home, "stop", "-y", run, timeout=60)
