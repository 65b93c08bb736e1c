"""The one way to make an HTTP client for our own parts talking to each other.

Server → agent, server → gateway, services' probes, gateway → server, TGI bridge → engine: all
are machine-to-machine calls inside a deployment, so they share one policy here:

- every request says who it is (`User-Agent: dstack/<version>`);
- the environment's HTTP(S)_PROXY settings are ignored (`trust_env=False`): an operator's proxy
  for the outside world must not catch loopback and private-network calls between our parts;
- a connect timeout short enough to notice a dead peer (5 s, or the whole budget if shorter)
  and, unless the caller knows better, a 10 s budget for everything else;
- a pool sized for many concurrent long polls (an agent serves every job's `/pull` at once).
"""

from __future__ import annotations

import functools
import ssl

import httpx

from dstack.version import __version__

USER_AGENT = f"dstack/{__version__}"
CONNECT_TIMEOUT = 5.0
DEFAULT_TIMEOUT = 10.0
LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=200)


@functools.cache
def _verifying_context() -> ssl.SSLContext:
    """One certificate-verifying TLS context for every client: building one loads the CA bundle,
    ~20 ms of CPU, which a server making a client per agent (re)attach paid 50 times at once."""
    return httpx.create_ssl_context(trust_env=False)


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for `token` (kept out of logs: httpx does not log headers)."""
    return {"Authorization": f"Bearer {token}"}


def internal_client(
    *,
    base_url: str = "",
    token: str | None = None,
    timeout: float | None = DEFAULT_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
    verify: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An async client with our defaults.

    `timeout`: read/write/pool seconds (None: wait as long as the peer takes, e.g. a generation
    stream); `token`: sent as a bearer token on every request; `verify=False` only where the peer's
    certificate is not for the address used (a gateway reached over loopback); `transport`: tests
    drive the caller with an `httpx.MockTransport`.
    """
    headers = {"User-Agent": USER_AGENT}
    if token is not None:
        headers.update(bearer(token))
    return httpx.AsyncClient(
        base_url=base_url,
        headers=headers,
        timeout=httpx.Timeout(timeout, connect=connect_timeout if timeout is None else min(connect_timeout, timeout)),
        limits=LIMITS,
        verify=_verifying_context() if verify else False,
        transport=transport,
        trust_env=False,
    )
