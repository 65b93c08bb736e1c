"""Services' readiness probes: each one sent with its own method, headers, body and timeout.

A replica is ready once `ready_after` rounds in a row (the largest of its probes' values) had
every probe answer 2xx; rounds are `interval` apart (the smallest of its probes' values).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import httpx

from dstack.core.models.configurations import ProbeSpec


async def probe_once(client: httpx.AsyncClient, base_url: str, probe: ProbeSpec) -> bool:
    """One probe request; True on a 2xx answer within the probe's timeout."""
    try:
        r = await client.request(
            probe.method.upper(),
            base_url + probe.url,
            headers={h.name: h.value for h in probe.headers},
            content=probe.body.encode() if probe.body is not None else None,
            timeout=float(probe.timeout),
        )
    except (httpx.HTTPError, OSError):
        return False
    return 200 <= r.status_code < 300


async def check_all(client: httpx.AsyncClient, base_url: str, probes: Sequence[ProbeSpec]) -> bool:
    """Every probe at once; True when all of them pass."""
    results = await asyncio.gather(*(probe_once(client, base_url, p) for p in probes))
    return all(results)


def ready_after(probes: Sequence[ProbeSpec]) -> int:
    return max((p.ready_after for p in probes), default=1)


def interval(probes: Sequence[ProbeSpec], default: float = 2.0) -> float:
    return min((float(p.interval) for p in probes), default=default)
