"""A real server with two users and two projects: `admin` (global admin, project `main`) and
`bob` (a plain user, project `bobs`); and a metrics token for a Prometheus scraper."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import ServerProcess, running_server

METRICS_TOKEN = "metrics-" + secrets.token_hex(8)


@dataclass
class Tenants:
    server: ServerProcess
    bob_token: str

    @property
    def admin(self) -> dict:
        return self.server.headers

    @property
    def bob(self) -> dict:
        return {"Authorization": f"Bearer {self.bob_token}"}

    def post(self, path: str, body: dict | None = None, headers: dict | None = None, **kw) -> httpx.Response:
        kw.setdefault("timeout", 60)
        return httpx.post(self.server.url + path, json=body or {}, headers=headers or self.admin, **kw)


@pytest.fixture(scope="module")
def tenants(tmp_path_factory) -> Tenants:
    with running_server(tmp_path_factory.mktemp("sec"), DSTACK_SERVER_METRICS_TOKEN=METRICS_TOKEN) as srv:
        r = httpx.post(f"{srv.url}/api/users/create", json={"username": "bob"}, headers=srv.headers)
        assert r.status_code == 200, r.text
        bob = r.json()["creds"]["token"]
        r = httpx.post(f"{srv.url}/api/projects/create", json={"project_name": "bobs"},
                       headers={"Authorization": f"Bearer {bob}"})
        assert r.status_code == 200, r.text
        yield Tenants(srv, bob)
