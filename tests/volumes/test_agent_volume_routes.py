"""The agent's volume routes (agent/volumes_api.py), through the agent's own app in-process: the
server makes and removes a fleet host's volumes with them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dstack.agent.app import create_app

TOKEN = "t" * 32


@pytest.fixture  # not named `agent`: that name marks a test slow (tests/conftest.py), and this one is in-process
def routes(tmp_path: Path) -> TestClient:
    return TestClient(create_app(tmp_path, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})


def test_make_check_and_remove_a_volume(routes: TestClient, tmp_path: Path) -> None:
    r = routes.post("/api/volumes/vol-1", json={"size_bytes": None})
    assert r.status_code == 200 and r.json() == {"size_enforced": False}, r.text
    made = tmp_path / "volumes" / "vol-1"
    assert made.is_dir() and stat.S_IMODE(made.stat().st_mode) == 0o700
    (made / "keep.txt").write_text("data")
    assert routes.post("/api/volumes/vol-1", json={}).status_code == 200  # again: no change
    assert (made / "keep.txt").read_text() == "data"
    assert routes.post("/api/volumes/check", json={"path": str(made)}).json() == {"is_dir": True}
    assert routes.post("/api/volumes/check", json={"path": str(tmp_path / "nope")}).json() == {"is_dir": False}
    assert routes.delete("/api/volumes/vol-1").status_code == 200
    assert not made.exists()


def test_refuses_bad_requests(routes: TestClient, tmp_path: Path) -> None:
    anonymous = TestClient(routes.app)
    assert anonymous.post("/api/volumes/vol-1", json={}).status_code == 401
    assert anonymous.delete("/api/volumes/vol-1").status_code == 401
    r = routes.post("/api/volumes/.hidden", json={})
    assert r.status_code == 400 and "invalid volume id" in r.text
    assert routes.post("/api/volumes/vol-2", json={"size_bytes": 0}).status_code == 422
    assert routes.post("/api/volumes/vol-2", json={"size_bytes": 1, "extra": 1}).status_code == 422
    assert routes.post("/api/volumes/check", json={"path": "relative/dir"}).status_code == 422
    assert not (tmp_path / "volumes" / "vol-2").exists()
