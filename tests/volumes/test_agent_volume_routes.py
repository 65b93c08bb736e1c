"""The agent's volume routes (agent/volumes_api.py), through the agent's own app in-process: the
server makes and removes a fleet host's volumes with them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dstack.agent.app import create_app

TOKEN = "t" * 32


@pytest.fixture
def agent(tmp_path: Path) -> TestClient:
    return TestClient(create_app(tmp_path, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})


def test_make_check_and_remove_a_volume(agent: TestClient, tmp_path: Path) -> None:
    r = agent.post("/api/volumes/vol-1", json={"size_bytes": None})
    assert r.status_code == 200 and r.json() == {"size_enforced": False}, r.text
    made = tmp_path / "volumes" / "vol-1"
    assert made.is_dir() and stat.S_IMODE(made.stat().st_mode) == 0o700
    (made / "keep.txt").write_text("data")
    assert agent.post("/api/volumes/vol-1", json={}).status_code == 200  # again: no change
    assert (made / "keep.txt").read_text() == "data"
    assert agent.post("/api/volumes/check", json={"path": str(made)}).json() == {"is_dir": True}
    assert agent.post("/api/volumes/check", json={"path": str(tmp_path / "nope")}).json() == {"is_dir": False}
    assert agent.delete("/api/volumes/vol-1").status_code == 200
    assert not made.exists()


def test_refuses_bad_requests(agent: TestClient, tmp_path: Path) -> None:
    anonymous = TestClient(agent.app)
    assert anonymous.post("/api/volumes/vol-1", json={}).status_code == 401
    assert anonymous.delete("/api/volumes/vol-1").status_code == 401
    r = agent.post("/api/volumes/.hidden", json={})
    assert r.status_code == 400 and "invalid volume id" in r.text
    assert agent.post("/api/volumes/vol-2", json={"size_bytes": 0}).status_code == 422
    assert agent.post("/api/volumes/vol-2", json={"size_bytes": 1, "extra": 1}).status_code == 422
    assert agent.post("/api/volumes/check", json={"path": "relative/dir"}).status_code == 422
    assert not (tmp_path / "volumes" / "vol-2").exists()
