"""Gateways end to end: `dstack gateway create` starts a real gateway process (TLS, a
self-signed certificate for *.example.test), services are published at
`https://<run>.example.test:<port>/`, the OpenAI endpoint at `https://gateway.example.test:<port>/v1`,
and the gateway keeps serving across a server restart.

Names under example.test do not resolve, so requests go to 127.0.0.1 with the real host name in
the Host header and in TLS SNI (`LoopbackTransport`), and the certificate is verified against
the self-signed certificate itself: the same checks a real client makes, without DNS.
"""

import json
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from dstack.api import Resources, RunStatus, Service
from dstack.core.errors import ServerClientError
from tests.certs import self_signed_cert
from tests.util import free_port, wait_until

DOMAIN = "example.test"
FINISHED = (RunStatus.TERMINATED, RunStatus.FAILED, RunStatus.DONE)
SMALL = Resources(cpu="0..1", memory="0.3GB", disk="1GB..")  # several replicas at once on one host

# An OpenAI-compatible upstream on the standard library only (replicas run in a bare venv).
OPENAI_APP = """
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _json(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._json(200, {"object": "list", "data": [{"id": "tiny-chat", "object": "model"}]})
        self._json(200, {"ok": True})

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.path != "/v1/chat/completions":
            return self._json(404, {"error": {"message": "no such path"}})
        text = "echo: " + req["messages"][-1]["content"]
        base = {"id": "c1", "created": int(time.time()), "model": req["model"]}
        if not req.get("stream"):
            return self._json(200, dict(base, object="chat.completion", choices=[{
                "index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data):
            raw = ("data: " + data + "\\n\\n").encode()
            self.wfile.write(b"%x\\r\\n" % len(raw) + raw + b"\\r\\n")
            self.wfile.flush()

        for i, word in enumerate(text.split(" ")):
            delta = {"content": (" " if i else "") + word}
            chunk(json.dumps(dict(base, object="chat.completion.chunk",
                                  choices=[{"index": 0, "delta": delta, "finish_reason": None}])))
        chunk(json.dumps(dict(base, object="chat.completion.chunk",
                              choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])))
        chunk("[DONE]")
        self.wfile.write(b"0\\r\\n\\r\\n")

ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"""


class LoopbackTransport(httpx.HTTPTransport):
    """Sends `https://*.example.test:<port>/...` to 127.0.0.1, keeping Host and TLS SNI as the name."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host == DOMAIN or host.endswith("." + DOMAIN):
            request.url = request.url.copy_with(host="127.0.0.1")
            request.extensions = {**request.extensions, "sni_hostname": host}
        return super().handle_request(request)


def cli(server, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", *args],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def kill_gateways(home: Path) -> None:
    for info in home.rglob("gateways/*.json"):
        try:
            os.killpg(json.loads(info.read_text())["pid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def describe(run) -> str:
    run.refresh()
    subs = [
        (s.status.value, s.termination_reason, s.termination_reason_message, s.exit_status)
        for j in run.jobs
        for s in j.job_submissions
    ]
    logs = b"".join(run.logs(follow=False)).decode(errors="replace")[-1500:]
    return f"run {run.name}: {run.status.value} {run.error} {subs}\n{logs}"


def wait_status(
    http: httpx.Client, url: str, want: int, headers: dict | None = None, timeout: float = 60, run=None
) -> httpx.Response:
    last: list[httpx.Response | Exception | None] = [None]

    def answered() -> httpx.Response | None:
        try:
            last[0] = r = http.get(url, headers=headers)
        except httpx.HTTPError as e:
            last[0] = e
            return None
        return r if r.status_code == want else None

    try:
        return wait_until(answered, timeout, 0.2, f"{url} to answer {want}")
    except AssertionError:
        got = last[0]
        raise AssertionError(
            f"{url}: wanted {want}, last {getattr(got, 'status_code', got)} "
            f"{getattr(got, 'text', '')[:300]}\n{describe(run) if run is not None else ''}"
        ) from None


@pytest.fixture
def gw_server(fresh_server):
    yield fresh_server
    kill_gateways(fresh_server.home)


def test_gateway_end_to_end(gw_server, tmp_path):
    server = gw_server
    cert, key = self_signed_cert(tmp_path, DOMAIN)
    port = free_port()
    http = httpx.Client(transport=LoopbackTransport(verify=ssl.create_default_context(cafile=str(cert))), timeout=30)
    auth = server.headers

    out = cli(
        server,
        "gateway",
        "create",
        "--name",
        "gw",
        "--domain",
        DOMAIN,
        "--port",
        str(port),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    ).stdout
    assert "gw" in out and f"https://gateway.{DOMAIN}:{port}" in out
    listing = cli(server, "gateway", "list").stdout
    assert "gw" in listing and DOMAIN in listing and "running" in listing and "yes" in listing
    client = server.client()
    gw = client.gateways.get("gw")
    assert (gw.domain, gw.port, gw.tls, gw.default, gw.status) == (DOMAIN, port, True, True, "running")
    pid = gw.pid
    assert pid and pid_alive(pid)
    assert (
        cli(
            server, "gateway", "create", "--name", "gw", "--domain", DOMAIN, "--port", str(free_port()), check=False
        ).returncode
        != 0
    )  # the name is taken

    # A file server, published on the gateway (the project's default).
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "hello.txt").write_text("hello through the gateway\n")
    (repo / "openai_app.py").write_text(OPENAI_APP)
    files_port = free_port()
    files = client.runs.submit(
        Service(commands=[f"python -m http.server {files_port}"], port=files_port, resources=SMALL),
        run_name="files",
        repo_dir=repo,
    )
    assert files.service_url == f"https://files.{DOMAIN}:{port}/"
    # `gateway: false` keeps a service on the in-server proxy.
    # (At zero replicas, so it takes no CPU: a host with 2 CPUs fits only two replicas at once.)
    inner = client.runs.submit(
        Service(
            commands=["sleep 60"],
            port=free_port(),
            gateway=False,
            resources=SMALL,
            replicas="0..1",
            scaling={"metric": "rps", "target": 10},
        ),
        run_name="inner",
        repo_dir=repo,
    )
    assert inner.service_url == f"{server.url}/proxy/services/main/inner/"
    inner.stop(abort=True)
    with pytest.raises(ServerClientError, match="no-such-gw"):
        client.runs.submit(Service(commands=["sleep 1"], port=9, gateway="no-such-gw", resources=SMALL), repo_dir=repo)

    # A model service: OpenAI-compatible on gateway.<domain>/v1.
    model_port = free_port()
    chat = client.runs.submit(
        Service(
            commands=[f"python openai_app.py {model_port}"],
            port=model_port,
            resources=SMALL,
            model={"name": "tiny-chat", "format": "openai"},
        ),
        run_name="chat",
        repo_dir=repo,
    )
    assert chat.service_url == f"https://chat.{DOMAIN}:{port}/"
    assert chat._run.service.model.base_url == f"https://gateway.{DOMAIN}:{port}/v1"

    url = files.service_url + "hello.txt"
    r = wait_status(http, url, 200, auth, run=files)
    assert r.text == "hello through the gateway\n"
    assert http.get(url).status_code == 401
    assert http.get(url, headers={"Authorization": "Bearer not-a-token"}).status_code == 403

    wait_status(http, chat.service_url + "v1/models", 200, auth, run=chat)
    ai = openai.OpenAI(base_url=chat._run.service.model.base_url, api_key=server.token, http_client=http)
    done = ai.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi there"}])
    assert done.choices[0].message.content == "echo: hi there"
    pieces = [
        c.choices[0].delta.content or ""
        for c in ai.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "a b c"}], stream=True
        )
        if c.choices
    ]
    assert "".join(pieces) == "echo: a b c" and len(pieces) > 2
    with pytest.raises(openai.PermissionDeniedError):  # a token that is not allowed: 403
        openai.OpenAI(base_url=chat._run.service.model.base_url, api_key="wrong", http_client=http).models.list()

    # The server restarts; the gateway process keeps serving the same services.
    server.restart()
    assert client.gateways.get("gw").pid == pid
    r = wait_status(http, url, 200, auth, timeout=30)
    assert r.text == "hello through the gateway\n"
    assert http.get(url).status_code == 401  # still asks the (restarted) server about tokens

    # Stopping a run takes it off the gateway.
    chat.stop(abort=True)
    chat.wait(statuses=FINISHED, timeout=30)
    wait_status(http, chat.service_url + "v1/models", 404, auth, timeout=15)

    # Deleting the gateway stops its process; the next service uses the in-server proxy.
    cli(server, "gateway", "delete", "gw", "-y")
    wait_until(lambda: not pid_alive(pid), 10, 0.1, "the gateway process to end after delete")
    assert "No gateways" in cli(server, "gateway", "list").stdout
    files.stop(abort=True)
    files.wait(statuses=FINISHED, timeout=30)
    again = client.runs.submit(
        Service(commands=["sleep 60"], port=free_port(), resources=SMALL), run_name="after", repo_dir=repo
    )
    assert again.service_url == f"{server.url}/proxy/services/main/after/"
    again.stop(abort=True)


@pytest.mark.parametrize("server", ["sqlite"], indirect=True)  # validation only: no database specifics
def test_gateway_create_validation(server, tmp_path):
    client = server.client()
    (tmp_path / "only.crt").write_text("x")
    bad = [
        dict(name="Bad_Name", domain=DOMAIN),
        dict(name="gw2", domain="not a domain"),
        dict(name="gw2", domain=DOMAIN, tls_cert=tmp_path / "only.crt"),
        dict(name="gw2", domain=DOMAIN, tls_cert=tmp_path / "missing.crt", tls_key=tmp_path / "missing.key"),
        dict(name="gw2", domain=DOMAIN, backend="aws"),
    ]
    for kwargs in bad:
        with pytest.raises(ServerClientError):
            client.gateways.create(port=free_port(), **kwargs)
    assert client.gateways.list() == []
    with pytest.raises(ServerClientError, match="not found"):
        client.gateways.get("nope")
    # A gateway's callbacks need the gateway's own token.
    r = httpx.post(f"{server.url}/api/proxy/authorize", json={"project": "main", "token": server.token})
    assert r.status_code == 401
    r = httpx.post(
        f"{server.url}/api/proxy/authorize", json={"project": "main", "token": server.token}, headers=server.headers
    )
    assert r.status_code == 403
    r = httpx.post(f"{server.url}/api/proxy/wake", json={"project": "main", "run_name": "x"}, headers=server.headers)
    assert r.status_code == 403
