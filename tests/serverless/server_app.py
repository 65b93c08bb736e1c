"""A small real server for tests and benchmarks: the serverless router and service on SQLite
(or the empty database `database_url` names).

Usage: python tests/serverless/server_app.py SPEC.json — SPEC has db, port, run_dir, token,
options (ServiceOptions fields), endpoints {id: {script, env, settings}} and database_url.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import uvicorn  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from sqlalchemy import select  # noqa: E402

import dstack.serverless.models  # noqa: E402,F401  (tables for create_all)
from dstack.proxy.auth import AuthCache  # noqa: E402
from dstack.server.db import Base, Database  # noqa: E402
from dstack.server.models import MemberModel, ProjectModel, RunModel, UserModel  # noqa: E402
from dstack.server.security import hash_token, project_access  # noqa: E402
from dstack.server.services.serverless_workers import project_names  # noqa: E402
from dstack.serverless.ports import ServerPorts  # noqa: E402
from dstack.serverless.router import ServerlessApp  # noqa: E402
from dstack.serverless.service import ServerlessService  # noqa: E402
from dstack.serverless.settings import EndpointSettings, ServiceOptions  # noqa: E402
from tests.serverless.launcher import SubprocessLauncher  # noqa: E402


async def seed(db: Database, spec: dict) -> tuple[str, dict[str, str]]:
    async with db.session() as s:
        user = (await s.execute(select(UserModel).where(UserModel.name == "alice"))).scalar_one_or_none()
        if user is None:
            user = UserModel(name="alice", token_hash=hash_token(spec["token"]), global_role="user")
            outsider = UserModel(name="mallory", token_hash=hash_token(spec["token"] + "-outsider"), global_role="user")
            s.add_all([user, outsider])
            await s.flush()
            project = ProjectModel(name="main", owner_id=user.id)
            s.add(project)
            await s.flush()
            s.add(MemberModel(project_id=project.id, user_id=user.id, project_role="admin"))
        project = (await s.execute(select(ProjectModel).where(ProjectModel.name == "main"))).scalar_one()
        runs = {}
        for eid in spec["endpoints"]:
            run = (await s.execute(select(RunModel).where(RunModel.run_name == eid))).scalar_one_or_none()
            if run is None:
                run = RunModel(project_id=project.id, user_id=user.id, run_name=eid, status="running", run_spec="{}")
                s.add(run)
                await s.flush()
            runs[eid] = run.id
        await s.commit()
        return project.id, runs


def build_app(spec: dict) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        db = Database(spec.get("database_url") or f"sqlite+aiosqlite:///{spec['db']}")
        async with db.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        project_id, runs = await seed(db, spec)
        eps = spec["endpoints"]
        launcher = SubprocessLauncher(
            {k: v["script"] for k, v in eps.items()}, {k: v.get("env", {}) for k, v in eps.items()}, spec["run_dir"]
        )
        # wired as the server wires it: the server's token check (cached) and project names
        ports = ServerPorts(db, launcher, AuthCache(functools.partial(project_access, db)), project_names(db))
        svc = ServerlessService(ports, f"http://127.0.0.1:{spec['port']}", ServiceOptions(**spec.get("options", {})))
        launcher.service = svc
        app.state.serverless = svc
        await svc.start()
        async with db.session() as s:
            for eid, ep in eps.items():
                await svc.register_endpoint(s, eid, project_id, runs[eid], EndpointSettings(**ep.get("settings", {})))
            await s.commit()
        yield
        await svc.stop()
        await db.dispose()

    app = FastAPI(lifespan=lifespan)
    app.mount("/v2", ServerlessApp(lambda: getattr(app.state, "serverless", None)))
    return app


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    uvicorn.run(build_app(spec), host="127.0.0.1", port=spec["port"], log_level="warning", timeout_graceful_shutdown=1)


if __name__ == "__main__":
    main()
