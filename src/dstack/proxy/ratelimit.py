"""Services' `rate_limits`: a token bucket per (service, rule, client key), 429 + Retry-After.

A rule applies to request paths under its `prefix` (the path inside the service, as the user
wrote it); when several match, the longest prefix wins. Each client key (the client's address, or
a header's value) gets `1 + burst` tokens refilled at `rps` per second; a request takes one, and
one that finds none is answered 429 with `Retry-After` set to when a token will be there.
Buckets are bounded in number: the least recently used are dropped first (a dropped bucket is a
full one again, which only ever favours the client).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

MAX_BUCKETS = 100_000


@dataclass(frozen=True)
class RateLimitRule:
    prefix: str
    rps: float
    burst: int = 0
    key: Literal["ip_address", "header"] = "ip_address"
    header: str | None = None

    def matches(self, path: str) -> bool:
        return path.startswith(self.prefix)


@dataclass
class _Bucket:
    tokens: float
    at: float


def pick_rule(rules: tuple[RateLimitRule, ...], path: str) -> tuple[int, RateLimitRule] | None:
    """The rule for `path` (longest matching prefix) and its index, or None."""
    best: tuple[int, RateLimitRule] | None = None
    for i, rule in enumerate(rules):
        if rule.matches(path) and (best is None or len(rule.prefix) > len(best[1].prefix)):
            best = (i, rule)
    return best


class RateLimiter:
    """Token buckets for every service's rules; `check` is called once per proxied request."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_buckets: int = MAX_BUCKETS) -> None:
        self._clock = clock
        self._max = max_buckets
        self._buckets: OrderedDict[tuple[str, str, int, str], _Bucket] = OrderedDict()

    def check(
        self,
        service: tuple[str, str],
        rules: tuple[RateLimitRule, ...],
        path: str,
        client: str,
        headers: dict[str, str],
    ) -> float | None:
        """None when the request may pass (a token is taken); else seconds until it may."""
        found = pick_rule(rules, path)
        if found is None:
            return None
        index, rule = found
        key = headers.get((rule.header or "").lower(), "") if rule.key == "header" else client
        bucket_key = (service[0], service[1], index, key)
        now = self._clock()
        capacity = 1.0 + rule.burst
        bucket = self._buckets.get(bucket_key)
        if bucket is None:
            bucket = _Bucket(capacity, now)
            self._buckets[bucket_key] = bucket
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(bucket_key)
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.at) * rule.rps)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / rule.rps

    def forget(self, service: tuple[str, str]) -> None:
        """Drop a removed service's buckets."""
        for key in [k for k in self._buckets if k[:2] == service]:
            del self._buckets[key]


def retry_after_header(seconds: float) -> bytes:
    """`Retry-After` in whole seconds, at least 1 (HTTP has no fractions here)."""
    return str(max(1, math.ceil(seconds))).encode()
