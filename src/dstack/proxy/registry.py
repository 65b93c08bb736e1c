"""In-memory registry of services and replicas that the proxy routes by.

The server is the source of truth; it pushes what it knows here (`upsert_service`,
`set_replicas`, `remove_service`). All methods are plain synchronous calls that must run on the
event loop thread that serves the proxy (they touch `asyncio.Event`s), and they are cheap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from dstack.proxy.metrics import ServiceMetrics
from dstack.proxy.ratelimit import RateLimitRule

WakeHook = Callable[[str, str], Awaitable[None]]


@dataclass(frozen=True)
class ModelInfo:
    """The model a service serves on the OpenAI-compatible endpoint."""

    name: str
    format: Literal["openai", "tgi"] = "openai"
    prefix: str = "/v1"
    chat_template: str | None = None
    eos_token: str | None = None
    bos_token: str | None = None


@dataclass(frozen=True)
class ServiceInfo:
    """What the proxy needs to know about one service run."""

    project: str
    run_name: str
    auth: bool = True
    model: ModelInfo | None = None
    strip_prefix: bool = True
    hold_timeout: float = 120.0
    min_replicas: int = 1
    #: why the last replica failed ("engine crashed: SIGSEGV"), for the proxy's 503 while none is ready
    last_error: str | None = None
    #: the service's `rate_limits` (proxy/ratelimit.py)
    rate_limits: tuple[RateLimitRule, ...] = ()


@dataclass(frozen=True)
class Replica:
    """One replica as the server sees it; `url` is e.g. `http://10.0.0.5:8000`."""

    id: str
    url: str
    ready: bool = True


@dataclass
class ServiceStats:
    """Traffic numbers for the autoscaler and the UI."""

    project: str
    run_name: str
    window: float
    requests: int
    rps: float
    in_flight: int
    replica_in_flight: dict[str, int]
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None


class ReplicaState:
    """Runtime state of one replica: where it is and how busy it is."""

    __slots__ = (
        "id",
        "url",
        "ready",
        "scheme",
        "host",
        "port",
        "base_path",
        "key",
        "hostport",
        "in_flight",
        "active",
        "down_until",
    )

    def __init__(self, replica: Replica) -> None:
        self.id = replica.id
        self.in_flight = 0
        self.active = True
        #: set after a failed connect so new requests avoid the replica for a moment
        self.down_until = 0.0
        self.update(replica)

    def update(self, replica: Replica) -> None:
        u = urlsplit(replica.url if "://" in replica.url else "http://" + replica.url)
        self.url = replica.url
        self.ready = replica.ready
        self.scheme = u.scheme or "http"
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if self.scheme == "https" else 80)
        self.base_path = u.path.rstrip("/")
        self.key = (self.scheme, self.host, self.port)
        default = 443 if self.scheme == "https" else 80
        self.hostport = (self.host if self.port == default else f"{self.host}:{self.port}").encode()


class ServiceState:
    """Runtime state of a service: its info, replicas, readiness event and counters."""

    def __init__(self, info: ServiceInfo) -> None:
        self.info = info
        self.replicas: list[ReplicaState] = []
        self.ready: list[ReplicaState] = []
        self.ready_event = asyncio.Event()
        self.metrics = ServiceMetrics()
        self.rr = 0
        self.last_wake = 0.0
        self.created = int(time.time())

    def pick(self, exclude: ReplicaState | None = None) -> ReplicaState | None:
        """Least-in-flight among ready replicas; ties go round-robin."""
        ready = self.ready
        n = len(ready)
        if n == 0:
            return None
        if n == 1:
            r = ready[0]
            return None if r is exclude else r
        self.rr = (self.rr + 1) % n
        best = None
        now = 0.0
        for i in range(n):
            r = ready[(self.rr + i) % n]
            if r is exclude:
                continue
            if r.down_until:
                now = now or time.monotonic()
                if r.down_until > now:
                    continue
                r.down_until = 0.0
            if best is None or r.in_flight < best.in_flight:
                best = r
        if best is None:  # every other replica failed recently: try one anyway
            for r in ready:
                if r is not exclude and (best is None or r.in_flight < best.in_flight):
                    best = r
        return best

    def _refresh_ready(self) -> None:
        self.ready = [r for r in self.replicas if r.ready]
        if self.ready:
            self.ready_event.set()
        else:
            self.ready_event.clear()


class ServiceRegistry:
    """Services by (project, run_name), and the hook the proxy calls to wake a scaled-to-zero one."""

    def __init__(self) -> None:
        self.services: dict[tuple[str, str], ServiceState] = {}
        #: set by the server: `async fn(project, run_name)`; called when a request finds no ready
        #: replica on a service with `min_replicas == 0` (at most once per second per service).
        self.on_wake: WakeHook | None = None

    def upsert_service(self, info: ServiceInfo) -> None:
        key = (info.project, info.run_name)
        state = self.services.get(key)
        if state is None:
            self.services[key] = ServiceState(info)
        else:
            state.info = info

    def remove_service(self, project: str, run_name: str) -> None:
        state = self.services.pop((project, run_name), None)
        if state is not None:
            for r in state.replicas:
                r.active = False
            state.replicas, state.ready = [], []
            state.ready_event.set()  # wake held requests; they will find the service gone

    def set_replicas(self, project: str, run_name: str, replicas: list[Replica]) -> None:
        """Replace the replica set; replicas that left stop getting requests, in-flight ones finish."""
        state = self.services.get((project, run_name))
        if state is None:
            raise KeyError(f"service {project}/{run_name} is not registered")
        old = {r.id: r for r in state.replicas}
        new: list[ReplicaState] = []
        for rep in replicas:
            rs = old.pop(rep.id, None)
            if rs is None:
                rs = ReplicaState(rep)
            else:
                rs.update(rep)
            new.append(rs)
        for gone in old.values():
            gone.active = False
        state.replicas = new
        state._refresh_ready()

    def get(self, project: str, run_name: str) -> ServiceState | None:
        return self.services.get((project, run_name))

    def find_run(self, run_name: str) -> list[ServiceState]:
        """Services with this run name in any project (for host routing without a fixed project)."""
        return [s for (p, r), s in self.services.items() if r == run_name]

    def models(self, project: str | None) -> list[ServiceState]:
        """Services that declare a model, in one project (or all when `project` is None)."""
        return [
            s for (p, _), s in self.services.items() if s.info.model is not None and (project is None or p == project)
        ]

    def find_model(self, project: str | None, name: str) -> ServiceState | None:
        for s in self.models(project):
            if s.info.model is not None and s.info.model.name == name:
                return s
        return None

    def stats(self, project: str, run_name: str, window: float = 60.0) -> ServiceStats:
        state = self.services.get((project, run_name))
        if state is None:
            raise KeyError(f"service {project}/{run_name} is not registered")
        m = state.metrics
        count = m.requests_in(window)
        p = m.percentiles(window)
        return ServiceStats(
            project=project,
            run_name=run_name,
            window=window,
            requests=count,
            rps=count / window,
            in_flight=m.in_flight,
            replica_in_flight={r.id: r.in_flight for r in state.replicas},
            errors=m.errors_in(window),
            p50_ms=p[0],
            p95_ms=p[1],
            p99_ms=p[2],
        )

    def maybe_wake(self, state: ServiceState) -> bool:
        """Call `on_wake` (debounced) if this service may scale from zero; True if holding makes sense."""
        if self.on_wake is None or state.info.min_replicas > 0:
            return False
        now = time.monotonic()
        if now - state.last_wake >= 1.0:
            state.last_wake = now
            hook = self.on_wake
            info = state.info

            async def _wake() -> None:
                try:
                    await hook(info.project, info.run_name)
                except Exception:  # the hold timeout reports the failure to the client
                    import logging

                    logging.getLogger(__name__).exception("wake hook failed for %s/%s", info.project, info.run_name)

            task = asyncio.get_running_loop().create_task(_wake())
            _background.add(task)
            task.add_done_callback(_background.discard)
        return True


_background: set[asyncio.Task] = set()
