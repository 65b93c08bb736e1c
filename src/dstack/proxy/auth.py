"""Token checks for services and serverless endpoints: the server's hook, cached briefly so the hot
paths rarely await it. The server builds one `AuthCache` and hands it to the proxy and to `/v2`."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable

from dstack.core.domain_errors import ErrorKind
from dstack.core.http_errors import status_for
from dstack.core.tokens import bearer_token as parse_bearer

#: what the proxy answers a caller who may not pass, from the one error map: no token, or a token
#: that is unknown or not a member's (the proxy does not tell those apart: it would leak members)
UNAUTHENTICATED = status_for(ErrorKind.NOT_AUTHENTICATED)
FORBIDDEN = status_for(ErrorKind.FORBIDDEN)


def refusal_status(token: str | None) -> int:
    return UNAUTHENTICATED if token is None else FORBIDDEN


class Access(enum.Enum):
    """The answer about a (project, token) pair. Truthy only when allowed, so a hook that answers a
    plain bool (a gateway's HTTP authorizer) fits where this is expected."""

    ALLOWED = "allowed"
    DENIED = "denied"  # a token, but not of a member of the project (or the hook cannot tell)
    UNKNOWN_TOKEN = "unknown_token"  # no active user holds this token

    def __bool__(self) -> bool:
        return self is Access.ALLOWED


#: `(project, bearer token or None) -> allowed`; implemented by the server (or the gateway's
#: HTTP client for it). Must not raise for an unknown token: return False (or an `Access`).
Authorizer = Callable[[str, str | None], Awaitable[bool | Access]]

MAX_TTL = 5.0


def _access(answer: bool | Access) -> Access:
    if isinstance(answer, Access):
        return answer
    return Access.ALLOWED if answer else Access.DENIED


class AuthCache:
    """Remembers allowed and denied answers for `ttl` seconds (at most 5, so revocation bites fast).

    Concurrent checks of the same (project, token) share one call to the authorizer.
    """

    def __init__(self, authorizer: Authorizer | None, ttl: float = MAX_TTL, negative_ttl: float = 2.0) -> None:
        self.authorizer = authorizer
        self.ttl = min(ttl, MAX_TTL)
        self.negative_ttl = min(negative_ttl, self.ttl)
        self._cache: dict[tuple[str, str], tuple[Access, float]] = {}
        self._pending: dict[tuple[str, str], asyncio.Future[Access]] = {}

    async def allowed(self, project: str, token: str) -> bool:
        return await self.check(project, token) is Access.ALLOWED

    async def check(self, project: str, token: str) -> Access:
        """The (possibly cached) answer for `token` on `project`. `project=""` (no project is named
        so) asks only whether the token is known: ALLOWED never, UNKNOWN_TOKEN or DENIED."""
        key = (project, token)
        hit = self._cache.get(key)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        if self.authorizer is None:
            return Access.DENIED
        fut: asyncio.Future[Access] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            try:
                got = _access(await self.authorizer(project, token))
            except Exception:
                got = Access.DENIED  # fail closed, but do not remember an outage for long
                self._cache[key] = (got, time.monotonic() + 0.5)
            else:
                ttl = self.ttl if got is Access.ALLOWED else self.negative_ttl
                self._cache[key] = (got, time.monotonic() + ttl)
                if len(self._cache) > 10_000:
                    self._evict()
            fut.set_result(got)
            return got
        finally:
            self._pending.pop(key, None)
            if not fut.done():
                fut.set_result(Access.DENIED)

    def _evict(self) -> None:
        now = time.monotonic()
        for k in [k for k, (_, exp) in self._cache.items() if exp <= now]:
            del self._cache[k]

    def clear(self) -> None:
        self._cache.clear()


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The token of a raw ASGI request's `Authorization: Bearer <t>` header (the first one), or None."""
    for name, value in headers:
        if name == b"authorization" or name.lower() == b"authorization":
            return parse_bearer(value)
    return None
