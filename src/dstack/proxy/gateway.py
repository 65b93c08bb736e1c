"""Standalone gateway: the same proxy, routed by Host, plus a registration API for the server.

    DSTACK_GATEWAY_TOKEN=T python -m dstack.proxy.gateway --domain D [--host 0.0.0.0] [--port P]
        [--tls-cert C --tls-key K] [--project NAME] [--auth-url URL] [--wake-url URL]

(`--token T` works too, but puts the token where `ps` shows it.) With `--project`, `Host:
<run>.<D>` and the model endpoint serve that project's services only, and a missing service
answers a caller without a member's token as a protected one would (401/403).

Serves `Host: <run>.<D>` (a service), `Host: gateway.<D>` (the OpenAI-compatible endpoint for
every registered model), the path-based `/services/...` and `/models/...` routes, and under
`/api/registry/` (every call needs `Authorization: Bearer <T>`):

- `POST   /api/registry/services` — upsert; body = ServiceInfo as JSON (model as an object or null)
- `DELETE /api/registry/services/{project}/{run}`
- `PUT    /api/registry/services/{project}/{run}/replicas` — `{"replicas": [{"id","url","ready"}]}`
- `GET    /api/registry/services/{project}/{run}/stats?window=60` — ServiceStats as JSON
- `GET    /api/registry/metrics` — Prometheus text; `GET /api/registry/healthcheck` needs no token.

Tokens of service callers are checked by `POST <auth-url> {"project", "token"}` sent with
`Authorization: Bearer <T>`: 200 allows, 401/403/404 deny (cached ≤ 5 s). Scale-from-zero:
`POST <wake-url> {"project", "run_name"}` (any 2xx is fine; the server then starts a replica and
PUTs the replicas when one is ready).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hmac
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from dstack.core.http_client import bearer, internal_client
from dstack.proxy.app import HostRouter, ProxyApp, build_proxy_app
from dstack.proxy.auth import Authorizer, bearer_token
from dstack.proxy.metrics import render_prometheus
from dstack.proxy.ratelimit import RateLimitRule
from dstack.proxy.registry import ModelInfo, Replica, ServiceInfo, ServiceRegistry


def http_authorizer(auth_url: str, token: str, client: httpx.AsyncClient) -> Authorizer:
    """An Authorizer that asks the dstack server; network trouble raises (treated as deny, briefly)."""

    async def authorize(project: str, user_token: str | None) -> bool:
        if user_token is None:
            return False
        r = await client.post(auth_url, json={"project": project, "token": user_token}, headers=bearer(token))
        if r.status_code == 200:
            return True
        if r.status_code in (401, 403, 404):
            return False
        raise RuntimeError(f"authorizer answered {r.status_code}")

    return authorize


def parse_service(data: Any) -> ServiceInfo:
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    fields = {f.name for f in dataclasses.fields(ServiceInfo)}
    unknown = set(data) - fields
    if unknown:
        raise ValueError(f"unknown fields: {sorted(unknown)}")
    data = dict(data)
    model = data.get("model")
    if isinstance(model, str):
        data["model"] = ModelInfo(name=model)
    elif isinstance(model, dict):
        data["model"] = ModelInfo(**model)
    if isinstance(data.get("rate_limits"), list):
        data["rate_limits"] = tuple(RateLimitRule(**r) for r in data["rate_limits"])
    info = ServiceInfo(**data)
    if not info.project or not info.run_name:
        raise ValueError("project and run_name are required")
    return info


def build_gateway_app(
    domain: str,
    token: str,
    auth_url: str | None = None,
    wake_url: str | None = None,
    registry: ServiceRegistry | None = None,
    read_timeout: float = 300.0,
    project: str | None = None,
) -> HostRouter:
    registry = registry or ServiceRegistry()
    client = internal_client()
    authorizer = http_authorizer(auth_url, token, client) if auth_url else None
    proxy_app: ProxyApp = build_proxy_app(registry, authorizer, read_timeout=read_timeout)
    if wake_url:

        async def wake(project: str, run_name: str) -> None:
            await client.post(wake_url, json={"project": project, "run_name": run_name}, headers=bearer(token))

        registry.on_wake = wake

    def guard(request: Request) -> Response | None:
        got = bearer_token(request.scope["headers"])
        if got is None:
            return JSONResponse(
                {"detail": "Authentication required: send 'Authorization: Bearer <gateway token>'"}, 401
            )
        if not hmac.compare_digest(got, token):
            return JSONResponse({"detail": "Invalid gateway token"}, 403)
        return None

    async def upsert(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        try:
            info = parse_service(await request.json())
        except (ValueError, TypeError) as e:
            return JSONResponse({"detail": f"Invalid service: {e}"}, 422)
        registry.upsert_service(info)
        return JSONResponse({"project": info.project, "run_name": info.run_name})

    async def delete(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        registry.remove_service(request.path_params["project"], request.path_params["run"])
        return JSONResponse({})

    async def replicas(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        try:
            body = await request.json()
            items = body["replicas"] if isinstance(body, dict) else body
            reps = [Replica(id=str(r["id"]), url=str(r["url"]), ready=bool(r.get("ready", True))) for r in items]
        except (ValueError, TypeError, KeyError) as e:
            return JSONResponse({"detail": f"Invalid replicas: {e}"}, 422)
        try:
            registry.set_replicas(request.path_params["project"], request.path_params["run"], reps)
        except KeyError as e:
            return JSONResponse({"detail": str(e.args[0])}, 404)
        return JSONResponse({"replicas": len(reps)})

    async def stats(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        window = float(request.query_params.get("window", "60"))
        try:
            s = registry.stats(request.path_params["project"], request.path_params["run"], window)
        except KeyError as e:
            return JSONResponse({"detail": str(e.args[0])}, 404)
        return JSONResponse(dataclasses.asdict(s))

    async def metrics(request: Request) -> Response:
        if (denied := guard(request)) is not None:
            return denied
        return PlainTextResponse(render_prometheus(registry), media_type="text/plain; version=0.0.4")

    async def healthcheck(request: Request) -> Response:
        return JSONResponse({"service": "dstack-gateway", "domain": domain, "services": len(registry.services)})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        proxy_app.proxy.pool.close()
        await client.aclose()

    svc = "/api/registry/services/{project}/{run}"
    api = Starlette(
        routes=[
            Route("/api/registry/healthcheck", healthcheck),
            Route("/api/registry/metrics", metrics),
            Route("/api/registry/services", upsert, methods=["POST"]),
            Route(svc, delete, methods=["DELETE"]),
            Route(svc + "/replicas", replicas, methods=["PUT"]),
            Route(svc + "/stats", stats),
            Mount("/", app=proxy_app),
        ],
        lifespan=lifespan,
    )
    return HostRouter(api, proxy_app, domain, project=project)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dstack.proxy.gateway", description="dstack gateway (service proxy)")
    p.add_argument("--domain", required=True, help="services are served at <run>.<domain>, models at gateway.<domain>")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=None, help="default 443 with TLS, else 80")
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument(
        "--token",
        default=os.environ.get("DSTACK_GATEWAY_TOKEN"),
        help="token the dstack server uses for the registration API (default: $DSTACK_GATEWAY_TOKEN)",
    )
    p.add_argument("--project", help="serve this project's services only")
    p.add_argument("--gateway-id", help="the server's id of this gateway (how it finds the process)")
    p.add_argument("--auth-url", help="e.g. http://server:3000/api/proxy/authorize")
    p.add_argument("--wake-url", help="e.g. http://server:3000/api/proxy/wake")
    p.add_argument("--read-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    if not args.token:
        p.error("--token or DSTACK_GATEWAY_TOKEN is required")
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    import uvicorn

    app = build_gateway_app(
        args.domain, args.token, args.auth_url, args.wake_url, read_timeout=args.read_timeout, project=args.project
    )
    port = args.port or (443 if args.tls_cert else 80)
    uvicorn.run(
        app,
        host=args.host,
        port=port,
        ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key,
        loop="auto",
        http="auto",
        log_level="warning",
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
