"""Run the test server (tests/serverless/server_app.py) as a real subprocess on a free port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.util import free_port as free_port  # re-exported: serverless tests import both from here
from tests.util import wait_until as wait_until

from .launcher import kill_all

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "workers"
TOKEN = "test-user-token"
FAST_OPTIONS = {
    "take_wait": 5.0,
    "tick": 0.2,
    "ping_interval_ms": 1000,
    "heartbeat_timeout": 8.0,
    "lost_job_grace": 3.0,
    "webhook_retry_delay": 0.5,
    "retention": 120.0,
    "init_timeout": 60.0,
    "extra_worker_env": {"RUNPOD_LOG_LEVEL": "WARN"},
}


def endpoint(script: str, min_: int = 0, max_: int = 1, env: dict[str, str] | None = None, **settings: Any) -> dict:
    return {
        "script": str(WORKERS / script),
        "env": env or {},
        "settings": {"workers_min": min_, "workers_max": max_, **settings},
    }


class Server:
    def __init__(
        self,
        run_dir: Path,
        endpoints: dict[str, dict],
        port: int | None = None,
        options: dict[str, Any] | None = None,
        database_url: str | None = None,
    ) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.spec = {
            "db": str(run_dir / "server.db"),
            "port": self.port,
            "run_dir": str(run_dir),
            "token": TOKEN,
            "options": {**FAST_OPTIONS, **(options or {})},
            "endpoints": endpoints,
            "database_url": database_url,
        }
        self.spec_path = run_dir / "spec.json"
        self.spec_path.write_text(json.dumps(self.spec))
        self.proc: subprocess.Popen | None = None
        self.client = httpx.Client(base_url=self.url + "/v2", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)

    def start(self) -> Server:
        log = open(self.run_dir / "server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "server_app.py"), str(self.spec_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        first = next(iter(self.spec["endpoints"]))
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + (self.run_dir / "server.log").read_text()[-3000:])
            try:
                if self.client.get(f"/{first}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start")

    def kill(self) -> None:
        """SIGKILL the server only (its workers live on, as after a crash)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        kill_all(str(self.run_dir))
        self.client.close()

    # ---- conveniences ----------------------------------------------------------------------

    def run(self, ep: str, inp: Any, **extra: Any) -> str:
        r = self.client.post(f"/{ep}/run", json={"input": inp, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "IN_QUEUE"
        return r.json()["id"]

    def status(self, ep: str, job_id: str) -> dict:
        r = self.client.get(f"/{ep}/status/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(
        self,
        ep: str,
        job_id: str,
        statuses: tuple[str, ...] = ("COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"),
        timeout: float = 30,
    ) -> dict:
        deadline = time.time() + timeout
        while True:
            st = self.status(ep, job_id)
            if st["status"] in statuses:
                return st
            if time.time() > deadline:
                raise AssertionError(f"job {job_id} stuck: {st}")
            time.sleep(0.05)

    def health(self, ep: str) -> dict:
        r = self.client.get(f"/{ep}/health")
        assert r.status_code == 200, r.text
        return r.json()

    def worker_pids(self) -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in (self.run_dir / "pids").glob("*.pid")}


def live_workers(health: dict) -> int:
    """Workers counted as up in a `/health` body: starting, idle or busy."""
    w = health["workers"]
    return w["initializing"] + w["idle"] + w["running"]


def killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def seed_endpoint(db: Any, endpoint_id: str = "ep") -> None:
    """Tables, and an endpoint with the project and owner it belongs to, in an empty database."""
    from dstack.server.db import Base
    from dstack.server.models import ProjectModel, UserModel
    from dstack.serverless.models import ServerlessEndpointModel

    async with db.engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    async with db.session() as session:
        user = UserModel(name="alice", token_hash="x", global_role="admin")
        session.add(user)
        await session.flush()
        project = ProjectModel(name="main", owner_id=user.id)
        session.add(project)
        await session.flush()
        session.add(ServerlessEndpointModel(endpoint_id=endpoint_id, project_id=project.id, settings="{}"))
        await session.commit()
