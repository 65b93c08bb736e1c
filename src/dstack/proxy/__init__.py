"""dstack.proxy — the data plane for services: routing, auth, balancing, OpenAI mapping.

The seam with the server
========================

Registry (``dstack.proxy.registry``) — the server owns one ``ServiceRegistry`` and pushes state
into it. All methods are synchronous and must be called on the event loop that serves the
proxy (the server's own loop when embedded)::

    registry = ServiceRegistry()
    registry.upsert_service(ServiceInfo(project, run_name, auth=True, model=None | ModelInfo(...),
                                        strip_prefix=True, hold_timeout=120.0, min_replicas=1))
    registry.set_replicas(project, run_name, [Replica(id, url="http://host:port", ready=True), ...])
        # the full current set; replicas that leave it get no new requests, in-flight ones finish.
        # KeyError if the service was not upserted first.
    registry.remove_service(project, run_name)
    registry.stats(project, run_name, window=60.0) -> ServiceStats
        # requests, rps (= requests / window; arrivals, held ones included), in_flight,
        # replica_in_flight {replica id: n}, errors (5xx), p50_ms / p95_ms / p99_ms
    registry.on_wake = async fn(project, run_name) -> None

``ModelInfo(name, format="openai"|"tgi", prefix="/v1", chat_template=None, eos_token=None,
bos_token=None)``; for ``tgi`` the server resolves the template/eos (configuration, or the model's
tokenizer_config / GGUF metadata) before upserting — the proxy renders only what it is given.

Scale from zero: when a request finds no ready replica and the service has ``min_replicas == 0``
and ``on_wake`` is set, the proxy calls ``on_wake`` (as a background task, at most once a second
per service — make it idempotent) and holds the request until ``set_replicas`` brings a ready
replica, or ``hold_timeout`` passes (→ 503 with ``Retry-After``). Otherwise no ready replica →
503 at once. The arrival is counted in ``stats`` either way, so the autoscaler sees demand.

Auth — ``Authorizer = Callable[[str, str | None], Awaitable[bool]]``: ``(project, bearer token)``
→ may this token's user reach services of that project. The server implements it (hash the
token, look up the user, check membership; return False, never raise, for unknown tokens).
Answers are cached ≤ 5 s (positive) / ≤ 2 s (negative), so a revoked token stops working within
seconds. Missing token → 401 ``{"detail": ...}`` with ``WWW-Authenticate: Bearer``; token not
allowed → 403. ``auth=False`` services skip the check. The ``Authorization`` header is REMOVED
before forwarding to replicas of ``auth=True`` services (it is the user's dstack credential and
must not leak to user code) and passed through untouched for ``auth=False`` services (there it
belongs to the app).

Apps (``dstack.proxy.app``)::

    proxy_app = build_proxy_app(registry, authorizer, connect_timeout=10.0, read_timeout=300.0, auth_ttl=5.0)
    server_app.mount("/proxy", proxy_app)                     # Starlette/FastAPI mount
    asgi = HostRouter(server_app, proxy_app, domain="example.com", project="main")  # optional, outermost

Paths ``ProxyApp`` answers, relative to where it is mounted (it strips ``root_path`` itself, so
it works mounted or standalone; it handles ``lifespan`` when standalone)::

    /services/{project}/{run}/{path...}   any method + WebSocket → replica; with strip_prefix
        the replica sees /{path...}?query, else the full original path; X-Forwarded-For/-Proto/
        -Host are set, X-Forwarded-Prefix (e.g. /proxy/services/p/r) when stripped
    /models/{project}/v1/models           GET, OpenAI model list of the project's model services
    /models/{project}/v1/chat/completions POST; also /v1/completions (and any /v1/* for format openai)

``HostRouter(app, proxy_app, domain, project=None)`` sends ``Host: <run>.<domain>`` to that
service (whole path, nothing stripped) and ``Host: gateway.<domain>`` to the model endpoint
(``/v1/...``); any other host goes to ``app``. ``project=None`` looks the run up in all projects.

Metrics: ``render_prometheus(registry) -> str`` (Prometheus text; the server decides where to
expose it — it names services, so keep it behind auth).

Gateway: ``python -m dstack.proxy.gateway`` runs the same code standalone; see
``dstack.proxy.gateway`` for its registration API and the two server endpoints it calls:
``POST /api/proxy/authorize {"project", "token"}`` → 200 allow / 403 deny, and (optional)
``POST /api/proxy/wake {"project", "run_name"}``, both sent with ``Authorization: Bearer <gateway token>``.

Errors the proxy itself answers: 404 unknown service/path, 401/403 auth, 502 replica unreachable
(after one retry on another ready replica when the connection could not be opened) or broken,
503 no ready replica / hold timeout, 504 no response within ``read_timeout``. The model endpoint
answers in OpenAI's shape ``{"error": {"message", "type", "param", "code"}, "detail": ...}``.

Run it under uvicorn with ``loop="uvloop", http="httptools"`` (and ``proxy_headers=False``
unless a trusted load balancer is in front); the forwarding client is our own (upstream.py).
"""

from dstack.proxy.app import HostRouter, ProxyApp, build_proxy_app
from dstack.proxy.auth import Authorizer
from dstack.proxy.metrics import render_prometheus
from dstack.proxy.registry import ModelInfo, Replica, ServiceInfo, ServiceRegistry, ServiceStats

__all__ = [
    "Authorizer",
    "HostRouter",
    "ModelInfo",
    "ProxyApp",
    "Replica",
    "ServiceInfo",
    "ServiceRegistry",
    "ServiceStats",
    "build_proxy_app",
    "render_prometheus",
]
