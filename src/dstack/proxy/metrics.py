"""Per-service counters: cheap to update on the hot path, summarised only when scraped."""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dstack.proxy.registry import ServiceRegistry

_HORIZON = 600  # seconds of per-second request counts kept for rps windows


class ServiceMetrics:
    """Requests, 5xx errors, in-flight and recent latencies of one service."""

    __slots__ = ("requests_total", "errors_total", "in_flight", "_counts", "_errors", "_stamps", "_lat")

    def __init__(self) -> None:
        self.requests_total = 0
        self.errors_total = 0
        self.in_flight = 0
        self._counts = [0] * _HORIZON
        self._errors = [0] * _HORIZON
        self._stamps = [-1] * _HORIZON
        self._lat: deque[tuple[float, float]] = deque(maxlen=50_000)

    def start(self) -> float:
        """Count a request as it arrives (the autoscaler wants arrivals, even held ones)."""
        now = time.monotonic()
        self._counts[self._bucket(now)] += 1
        self.requests_total += 1
        self.in_flight += 1
        return now

    def finish(self, started: float, status: int) -> None:
        now = time.monotonic()
        self.in_flight -= 1
        if status >= 500:
            self.errors_total += 1
            self._errors[self._bucket(now)] += 1
        self._lat.append((now, now - started))

    def _bucket(self, now: float) -> int:
        """The ring slot of second `now`, emptied first if it still holds an older second."""
        sec = int(now)
        i = sec % _HORIZON
        if self._stamps[i] != sec:
            self._stamps[i] = sec
            self._counts[i] = 0
            self._errors[i] = 0
        return i

    def _sum(self, arr: list[int], window: float) -> int:
        now = int(time.monotonic())
        lo = now - int(min(window, _HORIZON - 1))
        stamps = self._stamps
        return sum(arr[i] for i in range(_HORIZON) if lo < stamps[i] <= now)

    def requests_in(self, window: float) -> int:
        return self._sum(self._counts, window)

    def errors_in(self, window: float) -> int:
        return self._sum(self._errors, window)

    def percentiles(self, window: float) -> tuple[float | None, float | None, float | None]:
        """p50/p95/p99 latency in milliseconds over the last `window` seconds."""
        cutoff = time.monotonic() - window
        values = sorted(lat for t, lat in self._lat if t >= cutoff)
        if not values:
            return (None, None, None)

        def q(p: float) -> float:
            return values[min(len(values) - 1, int(p * len(values)))] * 1000.0

        return (q(0.50), q(0.95), q(0.99))


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(registry: ServiceRegistry, window: float = 60.0) -> str:
    """Prometheus text exposition of every registered service."""
    out: list[str] = []
    families = [
        ("dstack_proxy_requests_total", "counter", "Requests received by the proxy"),
        ("dstack_proxy_errors_total", "counter", "Requests answered with a 5xx status"),
        ("dstack_proxy_requests_in_flight", "gauge", "Requests being served now"),
        ("dstack_proxy_rps", "gauge", f"Requests per second over the last {int(window)} s"),
        ("dstack_proxy_latency_seconds", "summary", f"Request latency over the last {int(window)} s"),
        ("dstack_proxy_ready_replicas", "gauge", "Replicas that get traffic"),
        ("dstack_proxy_replica_in_flight", "gauge", "Requests being served by one replica"),
    ]
    rows: dict[str, list[str]] = {name: [] for name, _, _ in families}
    for (project, run), state in sorted(registry.services.items()):
        m = state.metrics
        lbl = f'project="{_esc(project)}",run="{_esc(run)}"'
        rows["dstack_proxy_requests_total"].append(f"dstack_proxy_requests_total{{{lbl}}} {m.requests_total}")
        rows["dstack_proxy_errors_total"].append(f"dstack_proxy_errors_total{{{lbl}}} {m.errors_total}")
        rows["dstack_proxy_requests_in_flight"].append(f"dstack_proxy_requests_in_flight{{{lbl}}} {m.in_flight}")
        rows["dstack_proxy_rps"].append(f"dstack_proxy_rps{{{lbl}}} {m.requests_in(window) / window:.6g}")
        for q, v in zip(("0.5", "0.95", "0.99"), m.percentiles(window), strict=True):
            val = "NaN" if v is None else f"{v / 1000.0:.6g}"
            rows["dstack_proxy_latency_seconds"].append(f'dstack_proxy_latency_seconds{{{lbl},quantile="{q}"}} {val}')
        rows["dstack_proxy_ready_replicas"].append(f"dstack_proxy_ready_replicas{{{lbl}}} {len(state.ready)}")
        for r in state.replicas:
            rows["dstack_proxy_replica_in_flight"].append(
                f'dstack_proxy_replica_in_flight{{{lbl},replica="{_esc(r.id)}"}} {r.in_flight}'
            )
    for name, kind, help_ in families:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(rows[name])
    return "\n".join(out) + "\n"
