"""The agent keeps env variables that hold secrets (`secret_env`) in memory only: a real agent."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dstack.agent.launcher import AgentInfo, start_agent
from tests.agent.test_agent import _stop_agent, pull, submit, text, wait_final, wait_gone

TOKEN = "secret-env-token"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentInfo]:
    info = start_agent(tmp_path / "home", TOKEN)
    yield info
    _stop_agent(info)


def _client(info: AgentInfo) -> httpx.Client:
    return httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


def test_secret_env_never_reaches_the_disk_and_a_restart_fails_the_job(agent: AgentInfo, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"PLAIN": "visible-value", "SECRET_ONE": "hidden-value-1"}
    with _client(agent) as c:
        waiting = submit(c, ["echo never"], start=False, env=env, secret_env=["SECRET_ONE"])
        kept = json.loads((home / "jobs" / waiting / "env.json").read_text())
        assert kept == {"PLAIN": "visible-value"}  # an agent restarted before the start keeps this
        state = (home / "jobs" / waiting / "state.json").read_text()
        assert "hidden-value-1" not in state and "SECRET_ONE" in state  # the name, never the value

        ran = submit(c, ['echo "$SECRET_ONE $PLAIN"'], env=env, secret_env=["SECRET_ONE"])
        resp, records = wait_final(c, ran)
        assert resp["state"] == "done" and text(records) == "hidden-value-1 visible-value\n"
    os.kill(agent.pid, signal.SIGKILL)
    wait_gone(agent.pid)
    for path in home.rglob("*"):
        if path.is_file():
            assert b"hidden-value-1" not in path.read_bytes(), path
    again = start_agent(home, TOKEN)
    try:
        with _client(again) as c:
            answer = pull(c, waiting)
            assert answer["state"] == "failed" and answer["message"] == "agent restarted"
    finally:
        _stop_agent(again)
