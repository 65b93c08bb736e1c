"""Project secrets end to end: a real server (SQLite, or PostgreSQL with DSTACK_TEST_POSTGRES), its
agent, the CLI and HTTP. A secret reaches a job's environment and nowhere else in plain text."""

from __future__ import annotations

import base64
import hashlib
import os
import secrets as pysecrets
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import SRC, ServerProcess, running_server

SMALL = {"cpu": "0..", "memory": "0.5GB..", "disk": "1GB.."}


def _api(srv: ServerProcess, path: str, body: Any = None, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or srv.token}"}
    return httpx.post(f"{srv.url}{path}", json=body if body is not None else {}, headers=headers, timeout=60)


def _cli(srv: ServerProcess, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(srv.env)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _user(srv: ServerProcess, name: str, role: str) -> str:
    r = _api(srv, "/api/users/create", {"username": name, "global_role": "user"})
    assert r.status_code == 200, r.text
    token = r.json().get("creds", {}).get("token") or r.json().get("token")
    assert token, r.json()
    r = _api(srv, "/api/projects/main/add_members", {"members": [{"username": name, "project_role": role}]})
    assert r.status_code == 200, r.text
    return str(token)


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    with running_server(tmp_path_factory.mktemp("secrets"), request.param) as srv:
        yield srv


def test_api_roles_and_shapes(server: ServerProcess) -> None:
    base = "/api/project/main/secrets"
    r = _api(server, f"{base}/create_or_update", {"name": "api_key", "value": "v-1"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "api_key" and r.json()["value"] is None
    assert _api(server, f"{base}/create_or_update", {"name": "api_key", "value": "v-2"}).status_code == 200
    listed = _api(server, f"{base}/list").json()
    assert [s["name"] for s in listed] == ["api_key"] and listed[0]["value"] is None
    got = _api(server, f"{base}/get", {"name": "api_key"}).json()
    assert got["value"] == "v-2"

    manager = _user(server, f"mgr-{uuid.uuid4().hex[:6]}", "manager")
    member = _user(server, f"usr-{uuid.uuid4().hex[:6]}", "user")
    assert _api(server, f"{base}/get", {"name": "api_key"}, token=manager).json()["value"] == "v-2"
    for path, body in (("list", {}), ("get", {"name": "api_key"}), ("create_or_update", {"name": "x", "value": "y"})):
        r = _api(server, f"{base}/{path}", body, token=member)
        assert r.status_code == 403, (path, r.text)
        assert "admins and managers" in r.json()["detail"][0]["msg"]

    r = _api(server, f"{base}/create_or_update", {"name": "bad name", "value": "x"})
    assert r.status_code == 400 and "invalid secret name" in r.text
    r = _api(server, f"{base}/create_or_update", {"name": "big", "value": "x" * 5001})
    assert r.status_code == 422 and "x" * 100 not in r.text  # refused without echoing the value
    r = _api(server, f"{base}/delete", {"secrets_names": ["api_key", "nope"]})
    assert r.status_code == 404 and "nope" in r.text
    assert _api(server, f"{base}/get", {"name": "api_key"}).status_code == 200  # all or nothing
    assert _api(server, f"{base}/delete", {"secrets_names": ["api_key"]}).status_code == 200
    assert _api(server, f"{base}/get", {"name": "api_key"}).status_code == 404


def test_cli(server: ServerProcess) -> None:
    name = f"cli_{uuid.uuid4().hex[:6]}"
    r = _cli(server, "secret", "set", name, stdin="from-stdin\n")
    assert r.returncode == 0, r.stderr
    r = _cli(server, "secret", "list")
    assert r.returncode == 0 and name in r.stdout and "from-stdin" not in r.stdout, r.stdout
    r = _cli(server, "secret", "get", name)
    assert r.returncode == 0 and "from-stdin" in r.stdout, r.stdout + r.stderr
    assert _cli(server, "secret", "delete", name).returncode == 1  # no terminal, no -y: not confirmed
    r = _cli(server, "secret", "delete", "-y", name)
    assert r.returncode == 0, r.stderr
    r = _cli(server, "secret", "get", name)
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_unknown_secret_fails_the_submission_naming_it(server: ServerProcess) -> None:
    conf = {
        "type": "task",
        "commands": ["true"],
        "env": ["A=${{ secrets.missing_one }}", "B=x-${{secrets.missing_two}}-y"],
        "resources": SMALL,
    }
    r = _api(server, "/api/project/main/runs/submit", {"run_spec": {"configuration": conf}})
    assert r.status_code == 400, r.text
    detail = r.json()["detail"][0]
    assert "'missing_one'" in detail["msg"] and "'missing_two'" in detail["msg"]
    assert sorted(detail["fields"]) == ["env.A", "env.B"]


def _wait_done(srv: ServerProcess, run_name: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _api(srv, "/api/project/main/runs/get", {"run_name": run_name}).json()
        if run["status"] in ("done", "failed", "terminated"):
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_name} did not finish")


def _logs(srv: ServerProcess, run_name: str) -> tuple[str, list[bytes]]:
    r = _api(srv, "/api/project/main/logs/poll", {"run_name": run_name, "limit": 1000})
    assert r.status_code == 200, r.text
    return r.text, [base64.b64decode(e["message"]) for e in r.json()["logs"]]


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                if any(n in data for n in needles):
                    found.append(str(path))
        except OSError:
            continue
    return found


def _wait_output(srv: ServerProcess, run_name: str, marker: str, timeout: float = 180) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw, lines = _logs(srv, run_name)
        out = b"".join(lines).decode()
        if marker in out:
            return raw, out
        run = _api(srv, "/api/project/main/runs/get", {"run_name": run_name}).json()
        assert run["status"] not in ("done", "failed", "terminated"), (run, out)
        time.sleep(0.5)
    raise AssertionError(f"run {run_name} printed no {marker!r}")


@pytest.mark.slow  # starts its own server/agent process
def test_secret_reaches_the_job_and_no_file_or_answer_holds_it(tmp_path: Path) -> None:
    """A server of its own, so every file it and its agent wrote can be searched."""
    value = "s3cr3t-" + pysecrets.token_hex(16)
    needles = [value.encode(), base64.b64encode(value.encode())]
    digest = hashlib.sha256(value.encode()).hexdigest()
    answers: list[str] = []
    with running_server(tmp_path) as srv:
        r = _api(srv, "/api/project/main/secrets/create_or_update", {"name": "tok", "value": value})
        answers.append(r.text)
        run_name = f"sec-{uuid.uuid4().hex[:6]}"
        conf = {
            "type": "task",
            "name": run_name,
            "env": ["MY_SECRET=${{ secrets.tok }}", "WRAPPED=pre-${{ secrets.tok }}-post", "HF_TOKEN=${{secrets.tok}}"],
            "commands": [
                'python3 -c "import hashlib, os; e = os.environ; '
                "print('sha', hashlib.sha256(e['MY_SECRET'].encode()).hexdigest()); "
                "print('wrapped', e['WRAPPED'] == 'pre-' + e['MY_SECRET'] + '-post', e['HF_TOKEN'] == e['MY_SECRET'])\"",
                "echo ready",
                "sleep 120",
            ],
            "resources": SMALL,
        }
        r = _api(srv, "/api/project/main/runs/get_plan", {"run_spec": {"configuration": conf}})
        answers.append(r.text)
        r = _api(srv, "/api/project/main/runs/submit", {"run_spec": {"configuration": conf}})
        assert r.status_code == 200, r.text
        answers.append(r.text)
        raw, out = _wait_output(srv, run_name, "ready")
        answers.append(raw)
        assert f"sha {digest}" in out, out  # the job has the value ...
        assert "wrapped True True" in out, out  # ... wherever the configuration put it
        answers.append(_api(srv, "/api/project/main/runs/get", {"run_name": run_name}).text)
        answers.append(_api(srv, "/api/project/main/runs/list", {}).text)
        answers.append(_api(srv, "/api/project/main/secrets/list").text)
        # While it runs, its files are on the agent: search them, the server's and agent's logs,
        # the database and everything else under the server's home.
        assert list(srv.home.rglob("state.json")) and list(srv.home.rglob("job.sh")), "no agent job files searched"
        assert list(srv.home.rglob("sqlite.db")), "the database was not searched"
        leaks = _files_holding(srv.home, needles)
        assert not leaks, leaks
        assert _files_holding(srv.home, [f"sha {digest}".encode()]), "the search finds what the job printed"
        r = _api(srv, "/api/project/main/runs/stop", {"runs_names": [run_name], "abort": True})
        assert r.status_code == 200, r.text
        answers.append(r.text)
        assert _wait_done(srv, run_name)["status"] in ("terminated", "failed")
        for answer in answers:
            assert value not in answer
    leaks = _files_holding(srv.home, needles)  # and after the server stopped (logs, WAL checkpointed)
    assert not leaks, leaks
