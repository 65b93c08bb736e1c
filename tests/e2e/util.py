"""Helpers the end-to-end modules share."""

import httpx

from tests.util import wait_until


def wait_ready(url: str, headers: dict | None = None, timeout: float = 60, path: str = "") -> httpx.Response:
    """Poll `url + path` until it answers 200 (a service's replica is up and ready)."""
    last: list[httpx.Response | None] = [None]

    def ready() -> httpx.Response | None:
        try:
            last[0] = httpx.get(url + path, headers=headers, timeout=10)
        except httpx.HTTPError:
            return None
        return last[0] if last[0].status_code == 200 else None

    try:
        return wait_until(ready, timeout, 0.2, f"{url}{path} to answer 200")
    except AssertionError:
        r = last[0]
        raise AssertionError(f"{url}{path} not ready: {r.status_code if r else None} {r.text if r else ''}") from None
