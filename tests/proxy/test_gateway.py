"""The standalone gateway process over TLS: registration API, Host routing, server-side auth."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.util import free_port, wait_port

from .conftest import SRC

TOKEN = "gw-secret"


def self_signed(tmp_path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "*.example.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("*.example.test"), x509.DNSName("example.test")]), False
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstreams):
    cert, key = self_signed(tmp_path_factory.mktemp("tls"))
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
