"""Small HTTP helpers for the security tests: raw requests to a real server, as a given user."""

from __future__ import annotations

import json
from typing import Any

import httpx

#: names that break dstack's rule (lowercase letters, digits, '-', starting with a letter, <= 41)
BAD_NAMES = [
    "../x",
    "a/b",
    "..",
    "a\nb",
    "a\x00b",
    "a;rm -rf ~",
    "a" * 1000,
    "naïve",
    "名前",
    "Upper",
    "",
    "-lead",
    "1abc",
    "a" * 42,
    "a b",
    "a_b",
    "a.b",
]


def post(
    server: Any, path: str, body: Any = None, token: str | None = None, raw: bytes | None = None, **kw: Any
) -> httpx.Response:
    """POST `body` (or `raw` bytes) to the server as `token`'s user (default: the admin)."""
    headers = {"Authorization": f"Bearer {token or server.token}", **kw.pop("headers", {})}
    if raw is not None:
        return httpx.post(
            server.url + path, content=raw, headers={"Content-Type": "application/json", **headers}, timeout=60, **kw
        )
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def detail(resp: httpx.Response) -> str:
    """The error messages of a dstack error body, joined (fails the test when it is not one)."""
    data = resp.json()
    assert isinstance(data.get("detail"), list) and data["detail"], data
    return " | ".join(str(item.get("msg", "")) for item in data["detail"])


def create_user(server: Any, name: str) -> str:
    """A new plain user; returns its token."""
    r = post(server, "/api/users/create", {"username": name})
    assert r.status_code == 200, r.text
    return r.json()["creds"]["token"]


def create_project(server: Any, name: str, token: str | None = None) -> None:
    r = post(server, "/api/projects/create", {"project_name": name}, token=token)
    assert r.status_code == 200, r.text


def run_names(server: Any, project: str, token: str | None = None) -> list[str]:
    r = post(server, f"/api/project/{project}/runs/list", {"only_active": False, "limit": 1000}, token=token)
    assert r.status_code == 200, r.text
    return [run["run_name"] for run in r.json()]


def task_spec(**conf: Any) -> dict:
    """A `run_spec` for a tiny task; `conf` adds or replaces configuration fields."""
    configuration = {
        "type": "task",
        "commands": ["true"],
        "resources": {"cpu": "0..", "memory": "0.1GB..", "disk": "0.1GB.."},
        **conf,
    }
    return {"configuration": configuration}


def raw_json(obj: Any) -> bytes:
    """JSON that may hold `float('inf')` as the literal `1e400` (what an attacker would send)."""
    return json.dumps(obj).replace("Infinity", "1e400").encode()
