"""Information leaks (issue 10, finding 7): metrics of every project only for admins and the
metrics token, one answer for existing and missing services, gateways that only admins may
publish on the host's network or point at server files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import httpx
import pytest

from tests.certs import self_signed_cert
from tests.e2e.test_gateway import DOMAIN
from tests.security.conftest import METRICS_TOKEN, Tenants
from tests.util import free_port, wait_until

INVALID_TLS = "invalid TLS certificate or key"


@pytest.fixture(scope="module")
def service(tenants: Tenants) -> str:
    """A service of project `main` at zero replicas: registered with the proxy, nothing running."""
    spec = {
        "run_name": "quiet-svc",
        "configuration": {
            "type": "service",
            "commands": ["sleep 600"],
            "port": 8000,
            "replicas": "0..1",
            "scaling": {"metric": "rps", "target": 10},
            "resources": {"cpu": "0..1", "memory": "0.3GB"},
        },
    }
    r = tenants.post("/api/project/main/runs/submit", {"run_spec": spec})
    assert r.status_code == 200, r.text
    wait_until(
        lambda: 'run="quiet-svc"' in httpx.get(f"{tenants.server.url}/metrics", headers=tenants.admin).text,
        60,
        0.3,
        "the service to reach the proxy",
    )
    yield "quiet-svc"
    tenants.post("/api/project/main/runs/stop", {"runs_names": ["quiet-svc"], "abort": True})


def test_metrics_need_an_admin_or_the_metrics_token(tenants: Tenants, service: str) -> None:
    url = f"{tenants.server.url}/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer nope"}).status_code == 401
    r = httpx.get(url, headers=tenants.bob)
    assert r.status_code == 403 and "quiet-svc" not in r.text
    for headers in (tenants.admin, {"Authorization": f"Bearer {METRICS_TOKEN}"}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 200 and 'project="main",run="quiet-svc"' in r.text


def test_proxy_answers_alike_for_existing_and_missing_services(tenants: Tenants, service: str) -> None:
    base = f"{tenants.server.url}/proxy/services/main"
    for headers, status in (({}, 401), ({"Authorization": "Bearer not-a-token"}, 403), (tenants.bob, 403)):
        existing = httpx.get(f"{base}/{service}/x", headers=headers)
        missing = httpx.get(f"{base}/no-such-svc/x", headers=headers)
        assert (
            (existing.status_code, existing.text) == (missing.status_code, missing.text) == (status, existing.text)
        ), existing.text
    # A member learns that it is missing.
    assert httpx.get(f"{base}/no-such-svc/x", headers=tenants.admin).status_code == 404
    # WebSockets too.
    ws_base = base.replace("http://", "ws://")
    for headers, status in (({}, 401), (tenants.bob, 403)):
        got = [_ws_refusal(f"{ws_base}/{svc}/ws", headers) for svc in (service, "no-such-svc")]
        assert got[0] == got[1] and got[0][0] == status, got
    # A project that does not exist answers as a foreign one.
    ghost = httpx.get(f"{tenants.server.url}/proxy/services/ghost/x/", headers=tenants.bob)
    assert ghost.status_code == 403
    models = f"{tenants.server.url}/proxy/models/main/v1/chat/completions"
    body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(models, json=body).status_code == 401
    assert httpx.post(models, json=body, headers=tenants.bob).status_code == 403
    assert httpx.post(models, json=body, headers=tenants.admin).status_code == 404


def create_gateway(t: Tenants, project: str, headers: dict, **kw) -> httpx.Response:
    body = {"name": kw.pop("name", "gw"), "domain": DOMAIN, "port": free_port(), **kw}
    return t.post(f"/api/project/{project}/gateways/create", body, headers=headers, timeout=120)


def test_only_admins_bind_gateways_beyond_loopback(tenants: Tenants) -> None:
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        r = create_gateway(tenants, "bobs", tenants.bob, host=host)
        assert r.status_code == 403, r.text
        assert "only a global admin" in r.json()["detail"][0]["msg"]
    assert tenants.post("/api/project/bobs/gateways/list", headers=tenants.bob).json() == []


def test_gateway_tls_files_are_no_oracle(tenants: Tenants, tmp_path: Path) -> None:
    # Plain users may not name server files at all.
    for cert in ("/etc/passwd", "/no/such/file.pem"):
        r = create_gateway(tenants, "bobs", tenants.bob, host="127.0.0.1", tls_cert=cert, tls_key=cert)
        assert r.status_code == 403, r.text
        assert "Traceback" not in r.text and "passwd" not in r.text
    # For an admin, a file that is not a certificate and a missing one get the same answer.
    answers = [
        create_gateway(tenants, "main", tenants.admin, tls_cert=c, tls_key=c)
        for c in ("/etc/passwd", "/no/such/file.pem")
    ]
    for r in answers:
        assert r.status_code == 400 and INVALID_TLS in r.text, r.text
        assert "Traceback" not in r.text and "root:" not in r.text
    assert answers[0].json() == answers[1].json()
    # Bad PEM contents: the same uniform answer.
    junk = "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
    r = create_gateway(tenants, "bobs", tenants.bob, host="127.0.0.1", tls_cert=junk, tls_key=junk)
    assert r.status_code == 400 and INVALID_TLS in r.text, r.text


def test_plain_user_gateway_with_pem_on_loopback(tenants: Tenants, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path, DOMAIN)
    r = create_gateway(tenants, "bobs", tenants.bob, name="bob-gw", tls_cert=cert.read_text(), tls_key=key.read_text())
    assert r.status_code == 200, r.text
    gw = r.json()
    try:
        assert (gw["host"], gw["tls"], gw["status"]) == ("127.0.0.1", True, "running")
        home = tenants.server.home / "server"
        with sqlite3.connect(f"file:{home / 'data' / 'sqlite.db'}?mode=ro", uri=True) as db:
            token, tls_key = db.execute("SELECT token, tls_key FROM gateways WHERE name = 'bob-gw'").fetchone()
        assert token.startswith("enc:v1:")
        assert (Path(tls_key).stat().st_mode & 0o777) == 0o600
        cmdline = Path(f"/proc/{gw['pid']}/cmdline").read_bytes()
        assert b"dstack.proxy.gateway" in cmdline and b"--token" not in cmdline
        assert tenants.server.token.encode() not in cmdline
        # It got its token by environment; its callbacks still authenticate with it (the server
        # compares with the decrypted tokens).
        environ = dict(
            kv.split(b"=", 1) for kv in Path(f"/proc/{gw['pid']}/environ").read_bytes().split(b"\0") if b"=" in kv
        )
        gw_token = environ[b"DSTACK_GATEWAY_TOKEN"].decode()
        r = httpx.post(
            f"{tenants.server.url}/api/proxy/authorize",
            json={"project": "bobs", "token": tenants.bob_token},
            headers={"Authorization": f"Bearer {gw_token}"},
        )
        assert r.status_code == 200 and r.json() == {"allowed": True}
        r = httpx.post(
            f"{tenants.server.url}/api/proxy/authorize",
            json={"project": "bobs", "token": tenants.bob_token},
            headers={"Authorization": "Bearer not-the-gateway-token"},
        )
        assert r.status_code == 403
    finally:
        r = tenants.post("/api/project/bobs/gateways/delete", {"names": ["bob-gw"]}, headers=tenants.bob)
        assert r.status_code == 200, r.text


def _ws_refusal(url: str, headers: dict) -> tuple[int, bytes]:
    """The status and body with which the proxy refuses a WebSocket handshake."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    try:
        with connect(url, additional_headers=headers, open_timeout=10):
            raise AssertionError(f"{url}: the handshake was accepted")
    except InvalidStatus as e:
        return e.response.status_code, e.response.body
