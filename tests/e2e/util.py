"""Helpers the end-to-end modules share."""

import time

import httpx


def wait_ready(url: str, headers: dict | None = None, timeout: float = 60, path: str = "") -> httpx.Response:
    """Poll `url + path` until it answers 200 (a service's replica is up and ready)."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            last = httpx.get(url + path, headers=headers, timeout=10)
            if last.status_code == 200:
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url}{path} not ready: {last.status_code if last else None} {last.text if last else ''}")
