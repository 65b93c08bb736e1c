"""The agent keeps a job's env out of its state file, and still has it after a restart that
happens before the job starts (issue 10, finding 3)."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import httpx
import psutil

from dstack.agent.launcher import start_agent
from tests.agent.test_agent import submit, text, wait_final

TOKEN = "agent-token-for-state-tests"
SECRET = "job-secret-value-4711"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        psutil.Process(pid).wait(10)
    except (ProcessLookupError, psutil.Error):
        pass


def test_env_survives_a_restart_before_start_but_never_reaches_state_json(tmp_path: Path) -> None:
    home = tmp_path / "home"
    info = start_agent(home, TOKEN)
    try:
        assert TOKEN.encode() not in Path(f"/proc/{info.pid}/cmdline").read_bytes()
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=info.url, headers=headers, timeout=30) as c:
            job_id = submit(c, ['echo "got=$MY_SECRET"'], start=False, env={"MY_SECRET": SECRET})
        job_dir = home / "jobs" / job_id
        # Nobody else may list or write it (jobs run as other users may get to traverse it).
        assert stat.S_IMODE(job_dir.stat().st_mode) & 0o066 == 0
        assert stat.S_IMODE((job_dir / "state.json").stat().st_mode) == 0o600
        assert SECRET not in (job_dir / "state.json").read_text()
        assert stat.S_IMODE((job_dir / "env.json").stat().st_mode) == 0o600
        _kill(info.pid)

        info = start_agent(home, TOKEN)
        with httpx.Client(base_url=info.url, headers=headers, timeout=30) as c:
            assert c.post(f"/api/jobs/{job_id}/start").status_code == 200
            _, records = wait_final(c, job_id)
            assert text(records) == f"got={SECRET}\n"
        assert not (job_dir / "env.json").exists(), "the env file outlived the start"
        assert SECRET not in (job_dir / "state.json").read_text()
        assert "env" not in json.loads((job_dir / "state.json").read_text())["spec"]
    finally:
        _kill(info.pid)
