"""The FastAPI application: routers, error bodies, and the lifespan that starts the pipeline."""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.routing import Mount
from starlette.types import Receive, Scope, Send

from dstack.core.body_limit import BodySizeLimit, RequestTooLarge
from dstack.core.domain_errors import DomainError
from dstack.core.errors import ConfigurationError
from dstack.core.http_errors import error_body, server_error, to_http
from dstack.core.models.runs import RunType
from dstack.core.private import private_dir
from dstack.proxy import ServiceRegistry, build_proxy_app, render_prometheus
from dstack.proxy.auth import Access, AuthCache
from dstack.server import bootstrap, crypto, migrate, ssh_entry
from dstack.server.backends.local import LocalBackend
from dstack.server.backends.slurm.allocations import SlurmAllocations
from dstack.server.backends.slurm.registry import SlurmBackends, set_slurm_backends
from dstack.server.backends.ssh.backend import Home, SSHBackend
from dstack.server.background.pipeline import Pipeline
from dstack.server.config_file import ConfigReloader, load_server_config
from dstack.server.db import Database, get_database, get_session, set_database
from dstack.server.db_errors import is_data_error
from dstack.server.gateways import router as gateways_router
from dstack.server.gateways.manager import GatewayManager
from dstack.server.models import RunModel
from dstack.server.routers import files as files_router
from dstack.server.routers import fleets as fleets_router
from dstack.server.routers import metrics as metrics_router
from dstack.server.routers import projects, repos, runs, users
from dstack.server.routers import secrets as secrets_router
from dstack.server.routers import tunnel as tunnel_router
from dstack.server.routers import volumes as volumes_router
from dstack.server.security import project_access, require_metrics_reader
from dstack.server.services import job_metrics
from dstack.server.services.fleets import FleetManager
from dstack.server.services.instances import InstanceManager
from dstack.server.services.logs import LogNotifier
from dstack.server.services.runs import run_to_wire
from dstack.server.services.serverless_workers import ServerlessBridge, server_ports
from dstack.server.services.service_replicas import ServiceManager
from dstack.server.settings import ServerSettings
from dstack.serverless.router import ServerlessApp
from dstack.serverless.service import ServerlessService
from dstack.version import __version__
from dstack.web import mount_dashboard

logger = logging.getLogger(__name__)
DATA_PLANE_MOUNTS = ("/proxy", "/v2")


async def _authorize(project: str, token: str | None) -> Access:
    """The auth hook behind the cache the proxy and `/v2` share: may this token's user reach the
    project's services and endpoints?"""
    return await project_access(get_database(), project, token)


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    # `~/.dstack/server/config.yml` (projects' backends): a mistake stops the start, naming file, line, field.
    server_config = load_server_config(settings.server_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        private_dir(settings.server_dir)
        crypto.init(settings.encryption_key_file)
        db = Database(settings.resolved_database_url())
        set_database(db)
        await migrate.upgrade(db)
        token, created = await bootstrap.ensure_admin(db, settings.admin_token)
        app.state.admin_token = token
        app.state.admin_created = created
        ssh_backend = SSHBackend(db, home=Home.of(settings.url, settings.host, settings.port))
        instances = InstanceManager(
            db,
            [LocalBackend(settings.server_dir / "local-agent"), ssh_backend],
            check_seconds=settings.agent_check_seconds,
            recovery_hold_seconds=settings.agent_unreachable_seconds,
        )
        await instances.start()
        fleets = FleetManager(db, instances, ssh_backend)
        app.state.fleets = fleets
        await fleets.start()
        notifier = LogNotifier()
        pipeline = Pipeline(db, instances, notifier)
        # Jobs placed on a project's Slurm cluster (backends/slurm/allocations.py); config.yml is
        # re-read when it changes (or on SIGHUP), so a backend may appear after the start.
        slurm = SlurmBackends(server_config, settings.server_dir)
        set_slurm_backends(slurm)

        def slurm_job_changed(run_id: str) -> None:
            pipeline.wake()
            notifier.notify(run_id)

        reloader = ConfigReloader(settings.server_dir, server_config)
        allocations = SlurmAllocations(db, instances, slurm, pipeline.agents.provision, slurm_job_changed, reloader)
        pipeline.slurm_launch = allocations.launch
        services = ServiceManager(db, registry, pipeline.wake, settings.autoscaler_window_seconds)
        pipeline.run_listeners.append(services.on_run_changed)
        app.state.services = services
        gateways = GatewayManager(db, settings)
        services.publishers.append(gateways.publish)
        app.state.gateways = gateways
        serverless = ServerlessService(server_ports(db, pipeline.wake, auth), base_url=settings.url)
        fleets.serverless = serverless  # workers on a host found unreachable are requeued at once
        bridge = ServerlessBridge(db, serverless)
        pipeline.run_listeners.append(lambda run_id: asyncio.ensure_future(bridge.on_run_changed(run_id)))
        app.state.serverless = serverless
        app.state.serverless_bridge = bridge

        async def on_run_submitted(run: RunModel) -> None:
            """Before the submit answers: a service is in the proxy's registry (its URL answers
            503 "no ready replica" until one is, never 404 "not running"), and a serverless
            endpoint is set up."""
            if run.run_type == RunType.SERVICE:
                await services.sync(run.id, gateways_later=True)
            await bridge.on_run_submitted(run)

        app.state.on_run_submitted = on_run_submitted
        app.state.db = db
        app.state.instances = instances
        app.state.log_notifier = notifier
        app.state.pipeline = pipeline
        for hook in app.state.startup_hooks:
            await hook(app)
        await gateways.start()
        if allocations is not None:
            await allocations.start()  # re-attaches surviving allocations before jobs are watched
        await pipeline.start()
        await services.start()
        await gateways.reconcile()
        await serverless.start()
        try:
            yield
        finally:
            await serverless.stop()
            await services.stop()
            await gateways.stop()
            await pipeline.stop()
            if allocations is not None:
                await allocations.close()
                set_slurm_backends(None)
            for hook in app.state.shutdown_hooks:
                await hook(app)
            await fleets.stop()
            await instances.close()
            await db.dispose()

    app = FastAPI(title="dstack", version=__version__, lifespan=lifespan)
    registry = ServiceRegistry()
    app.state.registry = registry
    auth = AuthCache(_authorize)  # one cache of token answers for the proxy and /v2
    app.state.auth_cache = auth
    # raw ASGI apps: their (dict-typed) scope is the MutableMapping Starlette passes
    app.mount("/proxy", build_proxy_app(registry, auth))  # type: ignore[arg-type]
    app.mount("/v2", ServerlessApp(lambda: getattr(app.state, "serverless", None)))  # type: ignore[arg-type]

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request, session: AsyncSession = Depends(get_session)) -> PlainTextResponse:
        """Every project's services: for admins and the metrics token (DSTACK_SERVER_METRICS_TOKEN) only."""
        await require_metrics_reader(request, session, settings.metrics_token)
        text = render_prometheus(registry) + await job_metrics.render_prometheus(session)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    app.state.settings = settings
    app.state.run_to_wire = run_to_wire
    app.state.startup_hooks = []
    app.state.shutdown_hooks = []

    async def _no_op(run: object) -> None:
        return None

    app.state.on_run_submitted = _no_op

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> JSONResponse:
        status, body = to_http(exc)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(ConfigurationError)
    async def _config_error(_: Request, exc: ConfigurationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_configuration"), status_code=400)

    @app.exception_handler(RequestTooLarge)
    async def _too_large(_: Request, exc: RequestTooLarge) -> JSONResponse:
        return JSONResponse(error_body(exc.detail, "too_large"), status_code=413)

    @app.exception_handler(DBAPIError)
    @app.exception_handler(OverflowError)
    async def _out_of_range(_: Request, exc: Exception) -> JSONResponse:
        """A safety net behind the request models' bounds: the database refused a value (too long,
        out of range, a NUL character); any other database error is a bug, answered as one."""
        if isinstance(exc, DBAPIError) and not is_data_error(exc):
            raise exc
        return JSONResponse(
            {
                "detail": [
                    {
                        "msg": "a value in the request is too large or not valid for the database",
                        "code": "invalid_request",
                    }
                ]
            },
            status_code=400,
        )

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        """A bug: the client gets JSON without the traceback (Starlette re-raises it, so it is logged)."""
        status, body = server_error()
        return JSONResponse(body, status_code=status)

    def _body_limit(path: str) -> tuple[int, str]:
        if path.startswith(tuple(m + "/" for m in DATA_PLANE_MOUNTS)):
            return 2**62, "-"  # the data planes bound their own bodies (services' uploads, /v2's 64 MiB)
        if (
            path.endswith(("/repos/upload_code", "/files/upload_archive"))
            and settings.code_upload_limit_bytes > settings.limits.max_body_bytes
        ):
            return settings.code_upload_limit_bytes, "DSTACK_SERVER_CODE_UPLOAD_LIMIT"
        return settings.limits.max_body_bytes, "DSTACK_SERVER_MAX_BODY_SIZE"

    app.add_middleware(BodySizeLimit, limit_for=_body_limit)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        items = [
            {
                "msg": e.get("msg", "invalid"),
                "code": "invalid_request",
                "fields": [".".join(str(x) for x in e.get("loc", ()))],
            }
            for e in exc.errors()
        ]
        return JSONResponse({"detail": items}, status_code=422)

    @app.get("/api/server/info")
    @app.post("/api/server/get_info")
    async def server_info() -> dict[str, str]:
        return {"server_version": __version__}

    @app.get("/healthcheck")
    async def healthcheck() -> dict[str, str]:
        return {"status": "ok"}

    for r in (users.router, projects.router, repos.router, runs.router, gateways_router.router):
        app.include_router(r)
    app.include_router(fleets_router.router)
    app.include_router(secrets_router.router)
    app.include_router(metrics_router.router)
    app.include_router(volumes_router.router)
    app.include_router(files_router.router)
    tunnel_router.install(app)  # WS tunnels to jobs' ports (`ssh RUN`), dev environments' inactivity stop
    job_metrics.install(app)  # pulls the agents' job metrics while the server runs
    ssh_entry.install(app)  # SSH for dstack's official client (DSTACK_SERVER_SSH_PORT; a free port when unset)
    mount_dashboard(app)  # `/` and `/static`: the web dashboard (dstack.web)
    return app


class DataPlaneFirst:
    """ASGI wrapper for serving: requests for the data-plane apps mounted on the FastAPI app
    (the proxy, serverless endpoints) go straight to them, skipping the middleware stack and
    router that the control-plane API needs and they don't. Everything else, lifespan included,
    goes to the FastAPI app; its mounts still answer if it is served unwrapped."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.mounts = [(r.path, r.app) for r in app.routes if isinstance(r, Mount) and r.path in DATA_PLANE_MOUNTS]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            for prefix, sub in self.mounts:
                if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                    await sub(dict(scope, root_path=scope.get("root_path", "") + prefix), receive, send)
                    return
        await self.app(scope, receive, send)
