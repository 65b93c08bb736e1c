"""dstack's official client (0.22.5 from PyPI) against our server: its CLI and its Python API.

Each step is what a user with `pip install dstack` does; the answers it validates with its own
models must pass, and what it prints must come from our server's real runs.
"""

import json
import textwrap
import time

import httpx
import yaml

from tests.compat.official import OfficialClient
from tests.util import free_port


def _run(server, name: str) -> dict:
    r = httpx.post(f"{server.url}/api/project/main/runs/get", headers=server.headers, json={"run_name": name})
    r.raise_for_status()
    return r.json()


def _wait_status(server, name: str, statuses: set[str], timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    run = _run(server, name)
    while run["status"] not in statuses:
        assert time.time() < deadline, f"run {name} still {run['status']}"
        time.sleep(0.5)
        run = _run(server, name)
    return run


def _write(path, text: str):
    path.write_text(textwrap.dedent(text))
    return path


def test_project_add_writes_its_config(official: OfficialClient, server):
    config = yaml.safe_load((official.home / ".dstack" / "config.yml").read_text())
    (project,) = config["projects"]
    assert (project["name"], project["url"], project["token"]) == ("main", server.url, server.token)


def test_apply_ps_logs_of_a_task(official: OfficialClient, server, tmp_path):
    conf = _write(
        tmp_path / "task.dstack.yml",
        """
        type: task
        name: official-task
        env:
          - GREETING=hello from the official client
        commands:
          - echo "$GREETING"
          - echo second line
        """,
    )
    out = official.cli("apply", "-f", str(conf), "-y", "-d", cwd=tmp_path).stdout
    assert "official-task" in out and "submitted" in out
    run = _wait_status(server, "official-task", {"done", "failed", "terminated"})
    assert run["status"] == "done", run
    ps = official.cli("ps", "-a").stdout
    (line,) = [ln for ln in ps.splitlines() if "official-task" in ln]
    assert "done" in line
    logs = official.cli("logs", "official-task").stdout
    assert logs.splitlines()[-2:] == ["hello from the official client", "second line"]


def test_stop_a_running_task(official: OfficialClient, server, tmp_path):
    conf = _write(
        tmp_path / "long.dstack.yml",
        """
        type: task
        name: official-long
        commands:
          - echo started
          - sleep 600
        """,
    )
    official.cli("apply", "-f", str(conf), "-y", "-d", cwd=tmp_path)
    _wait_status(server, "official-long", {"running"})
    assert "official-long" in official.cli("ps").stdout  # active runs only
    official.cli("stop", "official-long", "-y")
    run = _wait_status(server, "official-long", {"terminated", "failed", "done"}, timeout=60)
    assert run["status"] == "terminated" and run["termination_reason"] == "stopped_by_user"
    (line,) = [ln for ln in official.cli("ps", "-a").stdout.splitlines() if "official-long" in ln]
    assert "terminated" in line or "stopped" in line


def test_offer_lists_the_local_host(official: OfficialClient, server):
    out = official.cli("offer").stdout
    cpus = httpx.post(
        f"{server.url}/api/project/main/runs/get_plan",
        headers=server.headers,
        json={"run_spec": {"configuration": {"type": "task", "commands": [":"]}}},
    ).json()["job_plans"][0]["offers"][0]["resources"]["cpus"]
    (row,) = [ln for ln in out.splitlines() if ln.strip().startswith("1 ")]
    assert f"cpu={cpus}" in row and "local" in row


def test_unsupported_setting_is_refused_by_name(official: OfficialClient, tmp_path):
    conf = _write(
        tmp_path / "priv.dstack.yml",
        """
        type: task
        name: official-priv
        priority: 10
        commands: [echo hi]
        """,
    )
    r = official.cli("apply", "-f", str(conf), "-y", "-d", cwd=tmp_path, check=False)
    assert r.returncode != 0
    assert "'priority' is not supported yet" in r.stdout + r.stderr


def test_python_api_apply_logs_stop(official: OfficialClient, server, tmp_path):
    code = textwrap.dedent(
        """
        import json, time
        from dstack.api import Client, Task

        client = Client.from_config()
        key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOfficialClientTestKeyOnly0000000000000000 test"
        run = client.runs.apply_configuration(
            Task(name="api-task", commands=["echo one", "echo two"]), repo=None, ssh_key_pub=key
        )
        deadline = time.time() + 120
        while not run.status.is_finished() and time.time() < deadline:
            time.sleep(0.5)
            run.refresh()
        logs = b"".join(run.logs()).decode()
        long = client.runs.apply_configuration(
            Task(name="api-long", commands=["sleep 600"]), repo=None, ssh_key_pub=key
        )
        while long.status.value != "running" and time.time() < deadline:
            time.sleep(0.5)
            long.refresh()
        running = long.status.value
        long.stop()
        while not long.status.is_finished() and time.time() < deadline:
            time.sleep(0.5)
            long.refresh()
        names = [r.name for r in client.runs.list(all=True)]
        print(json.dumps({"status": run.status.value, "logs": logs, "running": running,
                          "stopped": long.status.value, "names": names}))
        """
    )
    r = official.script(code, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["status"] == "done"
    assert result["logs"].splitlines() == ["one", "two"]
    assert result["running"] == "running" and result["stopped"] == "terminated"
    assert {"api-task", "api-long"} <= set(result["names"])
    assert _run(server, "api-long")["termination_reason"] == "stopped_by_user"


ECHO_SERVICE = """
type: service
name: official-svc
commands:
  - |
    cat > echo_openai.py <<'PY'
    import json
    from http.server import BaseHTTPRequestHandler, HTTPServer
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
            msg = {"role": "assistant", "content": "echo: " + req["messages"][-1]["content"]}
            body = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": req.get("model"),
                "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}).encode()
            self.send_response(200); self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
    HTTPServer(("0.0.0.0", PORT), H).serve_forever()
    PY
  - python echo_openai.py
port: PORT
model: echo-model
"""


def test_service_with_the_openai_endpoint(official: OfficialClient, server, tmp_path):
    conf = tmp_path / "svc.dstack.yml"
    conf.write_text(ECHO_SERVICE.replace("PORT", str(free_port())))  # jobs may share the host's network
    official.cli("apply", "-f", str(conf), "-y", "-d", cwd=tmp_path)
    _wait_status(server, "official-svc", {"running"})
    url = f"{server.url}/proxy/models/main/v1/chat/completions"
    body = {"model": "echo-model", "messages": [{"role": "user", "content": "hi"}]}
    deadline = time.time() + 120
    r = httpx.post(url, headers=server.headers, json=body, timeout=10)
    while r.status_code != 200 and time.time() < deadline:  # the replica's readiness
        time.sleep(0.5)
        r = httpx.post(url, headers=server.headers, json=body, timeout=10)
    assert r.status_code == 200, (r.text, _run(server, "official-svc"))
    assert r.json()["choices"][0]["message"]["content"] == "echo: hi"
    code = textwrap.dedent(
        """
        from dstack.api import Client
        run = Client.from_config().runs.get("official-svc")
        print(run.status.value, run.service_url, run.service_model.name)
        """
    )
    out = official.script(code)
    assert out.returncode == 0, out.stderr[-3000:]
    status, service_url, model = out.stdout.split()
    assert status == "running" and model == "echo-model"
    assert service_url == f"{server.url}/proxy/services/main/official-svc/"
    official.cli("stop", "official-svc", "-y")
    assert _wait_status(server, "official-svc", {"terminated", "failed", "done"}, timeout=60)["status"] == "terminated"


def test_fleet_and_secret_commands(official: OfficialClient):
    assert "NAME" in official.cli("fleet").stdout  # the project's fleets (none yet): the listing parses
    official.cli("secret", "set", "official-secret", "s3cret-value")
    listing = official.cli("secret", "list").stdout
    assert "official-secret" in listing and "s3cret-value" not in listing
    assert "s3cret-value" in official.cli("secret", "get", "official-secret").stdout
