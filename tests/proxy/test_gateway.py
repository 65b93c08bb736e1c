"""The standalone gateway process over TLS: registration API, Host routing, server-side auth."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from tests.certs import self_signed_cert
from tests.util import free_port, wait_port

from .conftest import SRC

TOKEN = "gw-secret"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstreams):
    cert, key = (str(p) for p in self_signed_cert(tmp_path_factory.mktemp("tls"), "example.test"))
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dstack.proxy.gateway",
            "--domain",
            "example.test",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--tls-cert",
            cert,
            "--tls-key",
            key,
            "--token",
            TOKEN,
            "--auth-url",
            f"{upstreams['a'].url}/api/proxy/authorize",
        ],
        env={**os.environ, "PYTHONPATH": SRC},
    )
    try:
        wait_port(port)
        yield f"https://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_gateway_tls_registration_and_host_routing(gateway, upstreams):
    admin = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(verify=False, timeout=10) as c:
        assert c.get(f"{gateway}/api/registry/healthcheck").json()["service"] == "dstack-gateway"
        svc = {"project": "main", "run_name": "web", "auth": True, "model": {"name": "gw-model", "format": "openai"}}
        assert c.post(f"{gateway}/api/registry/services", json=svc).status_code == 401
        assert (
            c.post(f"{gateway}/api/registry/services", json=svc, headers={"Authorization": "Bearer x"}).status_code
            == 403
        )
        assert c.post(f"{gateway}/api/registry/services", json={"bogus": 1}, headers=admin).status_code == 422
        assert c.post(f"{gateway}/api/registry/services", json=svc, headers=admin).status_code == 200
        r = c.put(
            f"{gateway}/api/registry/services/main/web/replicas",
            headers=admin,
            json={"replicas": [{"id": "b", "url": upstreams["b"].url, "ready": True}]},
        )
        assert r.status_code == 200

        host = {"Host": "web.example.test"}
        assert c.get(f"{gateway}/hello?q=1", headers=host).status_code == 401
        assert c.get(f"{gateway}/hello?q=1", headers={**host, "Authorization": "Bearer wrong"}).status_code == 403
        r = c.get(f"{gateway}/hello?q=1", headers={**host, "Authorization": "Bearer good"})
        assert r.status_code == 200
        body = r.json()
        assert body["id"] == "b" and body["path"] == "/hello" and body["query"] == "q=1"
        assert body["headers"]["x-forwarded-proto"] == "https"
        assert body["headers"]["x-forwarded-host"] == "web.example.test"
        # the model endpoint at gateway.<domain>
        r = c.post(
            f"{gateway}/v1/chat/completions",
            headers={"Host": "gateway.example.test", "Authorization": "Bearer good"},
            json={"model": "gw-model", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "openai-echo b"
        r = c.get(f"{gateway}/v1/models", headers={"Host": "gateway.example.test", "Authorization": "Bearer good"})
        assert [m["id"] for m in r.json()["data"]] == ["gw-model"]

        stats = c.get(f"{gateway}/api/registry/services/main/web/stats", headers=admin).json()
        assert stats["requests"] >= 2 and stats["replica_in_flight"] == {"b": 0}
        metrics = c.get(f"{gateway}/api/registry/metrics", headers=admin).text
        assert 'dstack_proxy_requests_total{project="main",run="web"}' in metrics

        assert c.delete(f"{gateway}/api/registry/services/main/web", headers=admin).status_code == 200
        assert c.get(f"{gateway}/hello", headers={**host, "Authorization": "Bearer good"}).status_code == 404
