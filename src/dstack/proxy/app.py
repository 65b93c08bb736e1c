"""The proxy as ASGI apps: path-based (`build_proxy_app`) and host-based (`HostRouter`)."""

from __future__ import annotations

import json
from urllib.parse import quote

from dstack.proxy import ws
from dstack.proxy.auth import AuthCache, Authorizer, bearer_token, refusal_status
from dstack.proxy.forward import Proxy
from dstack.proxy.http import ASGIApp, Receive, Scope, Send, header, route_path, send_detail
from dstack.proxy.openai import ModelEndpoint
from dstack.proxy.ratelimit import RateLimiter, retry_after_header
from dstack.proxy.registry import ServiceRegistry, ServiceState

_SAFE = "/:@!$&'()*+,;=-._~"
_WS_DENIED = b'{"detail": "a valid Bearer token of a project member is required"}'


def _quote(path: str) -> bytes:
    return quote(path, safe=_SAFE).encode()


def _with_query(scope: Scope, path: bytes) -> bytes:
    qs = scope.get("query_string") or b""
    return path + b"?" + qs if qs else path


class ProxyApp:
    """Raw ASGI app serving, below wherever it is mounted:

    - `/services/{project}/{run}/{path...}` — any method, and WebSockets, to a replica of the run;
    - `/models/{project}/v1/models`, `/models/{project}/v1/chat/completions`, `/models/{project}/v1/completions`
      (and other `/v1/*` for `format: openai` models).
    """

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.registry = proxy.registry
        self.models = ModelEndpoint(proxy)
        self.limiter = RateLimiter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send, self.proxy)
            return
        path = route_path(scope)
        if path.startswith("/services/"):
            parts = path.split("/", 4)  # ['', 'services', project, run, rest]
            if len(parts) < 4 or not parts[2] or not parts[3]:
                await _not_found(scope, send, "Use /services/{project}/{run}/...")
                return
            project, run = parts[2], parts[3]
            state = self.registry.services.get((project, run))
            if state is None:
                await self.absent(scope, send, project, f"Service '{project}/{run}' is not running")
                return
            rest = "/" + parts[4] if len(parts) == 5 else "/"
            prefix = f"/services/{project}/{run}"
            target = _target(scope, prefix, rest, state.info.strip_prefix)
            await self.serve(scope, receive, send, state, target, (scope.get("root_path", "") or "") + prefix)
            return
        if path.startswith("/models/"):
            parts = path.split("/", 3)  # ['', 'models', project, rest]
            if len(parts) < 4 or not parts[2]:
                await _not_found(scope, send, "Use /models/{project}/v1/...")
                return
            await self.models.handle(scope, receive, send, parts[2], "/" + parts[3])
            return
        await _not_found(
            scope, send, "Not found: the proxy serves /services/{project}/{run}/... and /models/{project}/v1/..."
        )

    async def absent(self, scope: Scope, send: Send, project: str | None, detail: str) -> None:
        """Answer for a service that is not there. A caller who may not reach `project`'s services
        gets what a protected service would answer them (401 without a token, 403 with a token of
        a non-member), so answers do not tell which services exist; members get the 404."""
        token = bearer_token(scope["headers"])
        if token is None or (project is not None and not await self.proxy.auth.allowed(project, token)):
            if scope["type"] == "websocket":
                await ws.deny(scope, send, refusal_status(token), _WS_DENIED)
            else:
                await self.proxy.authorize(scope, send, project or "", True)  # sends the 401/403
            return
        await _not_found(scope, send, detail)

    async def serve(
        self, scope: Scope, receive: Receive, send: Send, state: ServiceState, target: bytes, prefix: str
    ) -> None:
        """Authorize, then forward an HTTP request or a WebSocket to one of the service's replicas."""
        info = state.info
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send, state, target)
            return
        if not await self.proxy.authorize(scope, send, info.project, info.auth):
            return
        if info.rate_limits and not await self._within_rate_limits(scope, send, state):
            return
        await self.proxy.forward(scope, receive, send, state, target, prefix if info.strip_prefix else "")

    async def _within_rate_limits(self, scope: Scope, send: Send, state: ServiceState) -> bool:
        """Take a token of the service's matching rate limit, or answer 429 with Retry-After."""
        info = state.info
        path = route_path(scope)
        own = f"/services/{info.project}/{info.run_name}"
        if path.startswith(own):
            path = path[len(own) :] or "/"
        client = (scope.get("client") or ("", 0))[0]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        wait = self.limiter.check((info.project, info.run_name), info.rate_limits, path, client, headers)
        if wait is None:
            return True
        detail = f"rate limit exceeded; retry in {wait:.2f}s"
        await send_detail(send, 429, detail, [(b"retry-after", retry_after_header(wait))])
        return False

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, state: ServiceState, target: bytes) -> None:
        info = state.info
        if info.auth:
            token = bearer_token(scope["headers"])
            if token is None or not await self.proxy.auth.allowed(info.project, token):
                await ws.deny(scope, send, refusal_status(token), _WS_DENIED)
                return
        replica = state.pick()
        if replica is None:
            await ws.deny(scope, send, 503, b'{"detail": "the service has no ready replica"}')
            return
        scheme = "wss" if replica.scheme == "https" else "ws"
        url = f"{scheme}://{replica.hostport.decode()}{replica.base_path}{target.decode('latin-1')}"
        metrics = state.metrics
        started = metrics.start()
        replica.in_flight += 1
        status = 500
        try:
            status = await ws.relay(scope, receive, send, url, info.auth)
        finally:
            replica.in_flight -= 1
            metrics.finish(started, status)


def _target(scope: Scope, prefix: str, rest: str, strip: bool) -> bytes:
    """Upstream request target: the path below the service prefix (or the whole path), raw-encoded."""
    root = scope.get("root_path", "") or ""
    raw: bytes | None = scope.get("raw_path")
    if strip:
        if raw is not None:
            for p in (root + prefix, prefix):
                pb = _quote(p)
                if raw.startswith(pb) and (len(raw) == len(pb) or raw[len(pb)] == 47):
                    return _with_query(scope, raw[len(pb) :] or b"/")
        return _with_query(scope, _quote(rest))
    if raw is not None:
        rb = _quote(root)
        return _with_query(scope, raw if raw.startswith(rb) else rb + raw)
    return _with_query(scope, _quote(root + prefix + rest))


async def _not_found(scope: Scope, send: Send, detail: str) -> None:
    if scope["type"] == "websocket":
        await ws.deny(scope, send, 404, json.dumps({"detail": detail}).encode())
    else:
        await send_detail(send, 404, detail)


async def _lifespan(receive: Receive, send: Send, proxy: Proxy) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif msg["type"] == "lifespan.shutdown":
            proxy.pool.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


def build_proxy_app(
    registry: ServiceRegistry,
    authorizer: Authorizer | AuthCache | None,
    *,
    connect_timeout: float = 10.0,
    read_timeout: float = 300.0,
    auth_ttl: float = 5.0,
) -> ProxyApp:
    """The path-based proxy app; mount it at `/proxy` (or serve it standalone)."""
    return ProxyApp(
        Proxy(registry, authorizer, connect_timeout=connect_timeout, read_timeout=read_timeout, auth_ttl=auth_ttl)
    )


class HostRouter:
    """ASGI middleware: `Host: <run>.<domain>` → that service (whole path, no prefix stripped),
    `Host: gateway.<domain>` → the model endpoint (`/v1/...`); any other host → `app`.

    `project` fixes the project (the in-server case); None looks the run up in every project
    (a gateway shared by several projects; an ambiguous run name answers 409).
    """

    def __init__(self, app: ASGIApp | None, proxy_app: ProxyApp, domain: str, project: str | None = None) -> None:
        self.app = app
        self.proxy_app = proxy_app
        self.domain = "." + domain.strip(".").lower()
        self.project = project

    def _sub(self, scope: Scope) -> str | None:
        host = header(scope, b"host")
        if not host:
            return None
        h = host.decode("latin-1").lower()
        if h.startswith("["):
            return None
        h = h.rsplit(":", 1)[0] if ":" in h else h
        if h.endswith(self.domain):
            sub = h[: -len(self.domain)]
            return sub if sub and "." not in sub else None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            if self.app is not None:
                await self.app(scope, receive, send)
            else:
                await self.proxy_app(scope, receive, send)
            return
        sub = self._sub(scope)
        if sub is None:
            if self.app is None:
                await _not_found(scope, send, "Unknown host")
            else:
                await self.app(scope, receive, send)
            return
        if sub == "gateway":
            await self.proxy_app.models.handle(scope, receive, send, self.project, route_path(scope))
            return
        registry = self.proxy_app.registry
        if self.project is not None:
            state = registry.services.get((self.project, sub))
        else:
            found = registry.find_run(sub)
            if len(found) > 1:
                await send_detail(
                    send, 409, f"Run name '{sub}' exists in several projects; use /services/{{project}}/{sub}/"
                )
                return
            state = found[0] if found else None
        if state is None:
            await self.proxy_app.absent(scope, send, self.project, f"Service '{sub}' is not running")
            return
        raw = scope.get("raw_path") or _quote(scope["path"])
        root = _quote(scope.get("root_path", "") or "")
        if root and raw.startswith(root):
            raw = raw[len(root) :] or b"/"
        await self.proxy_app.serve(scope, receive, send, state, _with_query(scope, raw), "")
