"""A real server with two users and two projects: `admin` (global admin, project `main`) and
`bob` (a plain user, project `bobs`); and a metrics token for a Prometheus scraper."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, running_server

METRICS_TOKEN = "metrics-" + secrets.token_hex(8)


#: A stand-in for the podman CLI (an external tool, not a part of dstack): it answers `version`,
#: has no image, and on `pull` keeps a copy of the --authfile it was given, then fails the pull.
FAKE_PODMAN = """#!/bin/sh
case " $* " in
  *" version "*) exit 0 ;;
  *" pull "*)
    while [ $# -gt 0 ]; do
      if [ "$1" = "--authfile" ]; then cp "$2" "{pulls}/$(date +%s%N).json"; fi
      shift
    done
    echo "Error: the fake registry refuses every pull" >&2
    exit 125 ;;
esac
exit 1
"""


@dataclass
class Tenants:
    server: ServerProcess
    bob_token: str
    pulls: Path  # the auth files the image pulls were given

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
    tmp = tmp_path_factory.mktemp("sec")
    pulls = tmp / "pulls"
    pulls.mkdir(mode=0o777)
    pulls.chmod(0o777)  # the agent may run the CLI as a job's user
    podman = tmp / "bin" / "podman"
    podman.parent.mkdir()
    podman.write_text(FAKE_PODMAN.format(pulls=pulls))
    podman.chmod(0o755)
    with running_server(tmp, DSTACK_SERVER_METRICS_TOKEN=METRICS_TOKEN, DSTACK_CONTAINER_RUNTIME=str(podman)) as srv:
        r = httpx.post(f"{srv.url}/api/users/create", json={"username": "bob"}, headers=srv.headers)
        assert r.status_code == 200, r.text
        bob = r.json()["creds"]["token"]
        r = httpx.post(
            f"{srv.url}/api/projects/create", json={"project_name": "bobs"}, headers={"Authorization": f"Bearer {bob}"}
        )
        assert r.status_code == 200, r.text
        yield Tenants(srv, bob, pulls)
