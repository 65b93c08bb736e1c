"""Token checks for services: the server's hook, cached briefly so the hot path rarely awaits it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

#: `(project, bearer token or None) -> allowed`; implemented by the server (or the gateway's
#: HTTP client for it). Must not raise for an unknown token: return False.
Authorizer = Callable[[str, str | None], Awaitable[bool]]

MAX_TTL = 5.0


class AuthCache:
    """Remembers allowed and denied answers for `ttl` seconds (at most 5, so revocation bites fast).

    Concurrent checks of the same (project, token) share one call to the authorizer.
    """

    def __init__(self, authorizer: Authorizer | None, ttl: float = MAX_TTL, negative_ttl: float = 2.0) -> None:
        self.authorizer = authorizer
        self.ttl = min(ttl, MAX_TTL)
        self.negative_ttl = min(negative_ttl, self.ttl)
        self._cache: dict[tuple[str, str], tuple[bool, float]] = {}
        self._pending: dict[tuple[str, str], asyncio.Future[bool]] = {}

    async def allowed(self, project: str, token: str) -> bool:
        key = (project, token)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        if self.authorizer is None:
            return False
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            try:
                ok = bool(await self.authorizer(project, token))
            except Exception:
                ok = False  # fail closed, but do not remember an outage for long
                self._cache[key] = (False, time.monotonic() + 0.5)
            else:
                ttl = self.ttl if ok else self.negative_ttl
                self._cache[key] = (ok, time.monotonic() + ttl)
                if len(self._cache) > 10_000:
                    self._evict()
            fut.set_result(ok)
            return ok
        finally:
            self._pending.pop(key, None)
            if not fut.done():
                fut.set_result(False)

    def _evict(self) -> None:
        now = time.monotonic()
        for k in [k for k, (_, exp) in self._cache.items() if exp <= now]:
            del self._cache[k]

    def clear(self) -> None:
        self._cache.clear()


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer` header, or None."""
    for name, value in headers:
        if name == b"authorization" or name.lower() == b"authorization":
            parts = value.decode("latin-1").strip().split(None, 1)
            if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1].strip():
                return parts[1].strip()
            return None
    return None
