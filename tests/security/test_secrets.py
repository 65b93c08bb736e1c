"""Credentials stay secret (issue 10, finding 3): never in an answer, a log or the CLI's output,
encrypted in the database, kept out of world-readable files and of command lines."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from dstack.api import Client, Resources, Task
from tests.conftest import running_server
from tests.security.conftest import Tenants
from tests.util import wait_until

PASSWORD = "registry-pw-" + secrets.token_hex(8)
ENV_SECRET = "env-secret-" + secrets.token_hex(8)
GREETING = "greeting-" + secrets.token_hex(8)
SECRETS = (PASSWORD, ENV_SECRET)
SMALL = {"cpu": "0..1", "memory": "0.3GB"}


def image_run_spec(name: str) -> dict:
    return {
        "run_name": name,
        "configuration": {
            "type": "task",
            "image": "registry.invalid/dstack-test/private:1",
            "commands": ["true"],
            "registry_auth": {"username": "me", "password": PASSWORD},
            "env": {"API_TOKEN": ENV_SECRET, "GREETING": GREETING},
            "resources": SMALL,
        },
    }


def assert_clean(text: str, where: str) -> None:
    for s in SECRETS:
        assert s not in text, f"a credential is in {where}"


def wait_finished(t: Tenants, project: str, name: str, timeout: float = 120) -> dict:
    def finished() -> dict | None:
        run = t.post(f"/api/project/{project}/runs/get", {"run_name": name}).json()
        return run if run["status"] in ("done", "failed", "terminated") else None

    return wait_until(finished, timeout, 0.5, f"run {name} to finish")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_registry_password_and_env_secrets_never_come_back(tenants: Tenants) -> None:
    t = tenants
    base = "/api/project/main/runs"
    plan = t.post(f"{base}/get_plan", {"run_spec": image_run_spec("secret-run")})
    assert plan.status_code == 200, plan.text
    assert_clean(plan.text, "get_plan")
    conf = plan.json()["run_spec"]["configuration"]
    assert conf["registry_auth"] == {"username": "me", "password": "***"}
    assert conf["env"] == {"API_TOKEN": "***", "GREETING": GREETING}  # only credential-like names hidden
    assert plan.json()["job_plans"][0]["job_spec"]["env"]["API_TOKEN"] == "***"

    # A plan applied as answered would run with '***' as the password: refused, saying where.
    r = t.post(f"{base}/apply", {"plan": plan.json()})
    assert r.status_code == 400, r.text
    msg = r.json()["detail"][0]["msg"]
    assert "registry_auth.password" in msg and "env.API_TOKEN" in msg

    r = t.post(f"{base}/submit", {"run_spec": image_run_spec("secret-run")})
    assert r.status_code == 200, r.text
    assert_clean(r.text, "submit")
    assert r.json()["run_spec"]["configuration"]["registry_auth"]["password"] == "***"

    answers = {
        "get": t.post(f"{base}/get", {"run_name": "secret-run"}),
        "list": t.post(f"{base}/list", {}),
        "global list": t.post("/api/runs/list", {}),
        "plan of the existing run": t.post(f"{base}/get_plan", {"run_spec": image_run_spec("secret-run")}),
    }
    for where, answer in answers.items():
        assert answer.status_code == 200, answer.text
        assert_clean(answer.text, where)
    assert answers["plan of the existing run"].json()["current_resource"]["run_name"] == "secret-run"
    got = answers["get"].json()
    assert got["jobs"][0]["job_spec"]["env"] == {"API_TOKEN": "***", "GREETING": GREETING}

    ps = subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", "ps", "-a", "-v"],
        env=t.server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ps.returncode == 0, ps.stderr
    assert "secret-run" in ps.stdout
    assert_clean(ps.stdout + ps.stderr, "dstack ps")

    run = wait_finished(t, "main", "secret-run")  # the pipeline decrypted the password for the pull:
    assert "the fake registry refuses every pull" in json.dumps(run["jobs"]), run
    auth_files = [json.loads(p.read_text()) for p in t.pulls.glob("*.json")]
    assert len(auth_files) == 1, auth_files
    token = auth_files[0]["auths"]["registry.invalid"]["auth"]
    assert base64.b64decode(token).decode() == f"me:{PASSWORD}"
    assert_clean(t.server.logs(tail=10**7), "the server log")


def test_a_password_too_long_to_store_encrypted_is_refused(tenants: Tenants) -> None:
    spec = image_run_spec("long-secret")
    spec["configuration"]["registry_auth"]["password"] = "x" * 60_000  # fits the field, not once encrypted
    r = tenants.post("/api/project/main/runs/submit", {"run_spec": spec})
    assert r.status_code == 400 and "registry_auth.password" in r.text, r.text
    assert tenants.post("/api/project/main/runs/get", {"run_name": "long-secret"}).status_code == 404


def test_ciphertext_cannot_be_submitted(tenants: Tenants) -> None:
    """Else a stored secret copied out of the database would be decrypted into the submitter's job."""
    data = tenants.server.home / "server" / "data"
    with sqlite3.connect(f"file:{data / 'sqlite.db'}?mode=ro", uri=True) as db:
        (run_spec,) = db.execute("SELECT run_spec FROM runs WHERE run_name = 'secret-run'").fetchone()
    stolen = json.loads(run_spec)["configuration"]["env"]["API_TOKEN"]
    spec = {
        "run_name": "thief",
        "configuration": {"type": "task", "commands": ["echo $LOOT"], "env": {"LOOT": stolen}, "resources": SMALL},
    }
    r = tenants.post("/api/project/bobs/runs/submit", {"run_spec": spec}, headers=tenants.bob)
    assert r.status_code == 400 and "env.LOOT" in r.text and "reserved" in r.text, r.text


def test_env_reaches_the_job_in_plain_text(tenants: Tenants) -> None:
    """The pipeline decrypts what it stored; the Python API applies plans with its own values."""
    client = Client.from_config(project_name="main", server_url=tenants.server.url, user_token=tenants.server.token)
    # Digests, not the values: the job's output is stored as it is (the database test looks for the values).
    task = Task(
        commands=[
            'printf %s "$API_TOKEN" | sha256sum',
            'printf %s "$GREETING" | sha256sum',
            "env | grep -c DSTACK_AGENT_TOKEN || true",
        ],
        env={"API_TOKEN": ENV_SECRET, "GREETING": GREETING},
        resources=Resources(**SMALL),
    )
    run = client.runs.submit(task, run_name="env-run")
    out = b"".join(run.logs()).decode()
    digests = [hashlib.sha256(v.encode()).hexdigest() + "  -" for v in (ENV_SECRET, GREETING)]
    assert out.splitlines() == [*digests, "0"], out
    assert run._run.run_spec.configuration["env"]["API_TOKEN"] == "***"


def test_database_holds_no_plain_credential(tenants: Tenants) -> None:
    data = tenants.server.home / "server" / "data"
    blob = b"".join(p.read_bytes() for p in data.glob("sqlite.db*"))
    assert blob, "no database files"
    for s in (*SECRETS, GREETING):  # env values are encrypted too, not only credential-like ones
        assert s.encode() not in blob, f"{s[:12]}... is stored in plain text"
    agent_token = json.loads((tenants.server.home / "server" / "local-agent" / "agent.json").read_text())["token"]
    assert agent_token.encode() not in blob
    with sqlite3.connect(f"file:{data / 'sqlite.db'}?mode=ro", uri=True) as db:
        ((agent,),) = db.execute("SELECT agent FROM instances").fetchall()
        (run_spec,) = db.execute("SELECT run_spec FROM runs WHERE run_name = 'secret-run'").fetchone()
    assert json.loads(agent)["token"].startswith("enc:v1:")
    conf = json.loads(run_spec)["configuration"]
    assert conf["registry_auth"]["password"].startswith("enc:v1:")
    assert all(v.startswith("enc:v1:") for v in conf["env"].values())


@pytest.fixture(scope="module")
def sleeper(tenants: Tenants):
    """A running job with secrets in its env (the agent deletes a job's files once it ended)."""
    spec = {
        "run_name": "sleeper",
        "configuration": {
            "type": "task",
            "commands": ["sleep 300"],
            "env": {"API_TOKEN": ENV_SECRET, "GREETING": GREETING},
            "resources": SMALL,
        },
    }
    r = tenants.post("/api/project/main/runs/submit", {"run_spec": spec})
    assert r.status_code == 200, r.text
    wait_until(
        lambda: tenants.post("/api/project/main/runs/get", {"run_name": "sleeper"}).json()["status"] == "running",
        120,
        0.3,
        "the sleeper to run",
    )
    yield
    tenants.post("/api/project/main/runs/stop", {"runs_names": ["sleeper"], "abort": True})


def test_agent_files_hold_no_credential(tenants: Tenants, sleeper) -> None:
    jobs = tenants.server.home / "server" / "local-agent" / "jobs"
    states = list(jobs.glob("*/state.json"))
    assert states
    for path in states:
        assert "env" not in json.loads(path.read_text())["spec"]
    for path in jobs.rglob("*"):
        if path.is_file() and "repo" not in path.relative_to(jobs).parts and "venv" not in path.relative_to(jobs).parts:
            text = path.read_bytes().decode(errors="replace")
            assert_clean(text, str(path))
    assert_clean((jobs.parent / "agent.log").read_text(errors="replace"), "the agent's log")
    assert not list(jobs.glob("*/env.json")), "a started job's env file is left behind"
    assert not list(jobs.rglob(".registry-auth")), "the pull's auth file is left behind"


def test_file_modes(tenants: Tenants, sleeper) -> None:
    home = tenants.server.home
    server_dir = home / "server"
    agent_home = server_dir / "local-agent"
    for d in (home, server_dir, server_dir / "data"):
        assert mode(d) == 0o700, f"{d} is {oct(mode(d))}"
    # Nobody else may list or write the agent's (jobs run as other users may get to traverse them).
    for d in (agent_home, agent_home / "jobs", *agent_home.glob("jobs/*/")):
        assert mode(d) & 0o066 == 0, f"{d} is {oct(mode(d))}"
    assert list(agent_home.glob("jobs/*/state.json")), "no job to look at"
    files = [
        home / "config.yml",
        server_dir / "encryption.key",
        agent_home / "agent.json",
        agent_home / "agent.log",
        *server_dir.glob("data/sqlite.db*"),
        *agent_home.glob("jobs/*/state.json"),
        *agent_home.glob("jobs/*/logs.jsonl"),
    ]
    assert any(f.name == "sqlite.db-wal" for f in files), "expected the WAL file to exist while the server runs"
    for f in files:
        assert mode(f) == 0o600, f"{f} is {oct(mode(f))}"


def test_tokens_are_not_on_command_lines(tenants: Tenants) -> None:
    info = json.loads((tenants.server.home / "server" / "local-agent" / "agent.json").read_text())
    cmdline = Path(f"/proc/{info['pid']}/cmdline").read_bytes()
    assert b"dstack.agent" in cmdline
    assert info["token"].encode() not in cmdline


def test_key_file_rotation(tmp_path: Path) -> None:
    """A rotated key file decrypts what the old key encrypted, and encrypts with the new key."""
    from dstack.server import crypto

    key_file = tmp_path / "server" / "encryption.key"
    crypto.init(key_file)
    assert mode(key_file) == 0o600 and mode(key_file.parent) == 0o700
    old = crypto.encrypt("s3cret")
    assert old.startswith("enc:v1:") and "s3cret" not in old
    crypto.rotate(key_file)
    assert len(key_file.read_text().split()) == 2
    assert crypto.decrypt(old) == "s3cret"
    new = crypto.encrypt("s3cret")
    crypto.init(tmp_path / "other.key")  # a different key cannot read them
    with pytest.raises(crypto.DecryptionError):
        crypto.decrypt(new)
    assert crypto.decrypt("plain, from before encryption") == "plain, from before encryption"


def test_which_fields_are_credentials(tmp_path: Path) -> None:
    from dstack.server import crypto
    from dstack.server.services import secrets as s

    crypto.init(tmp_path / "k")
    conf = {
        "type": "service",
        "registry_auth": {"username": "u", "password": "pw"},
        "model": {"name": "m", "eos_token": "</s>", "bos_token": "<s>"},
        "env": {
            "HF_TOKEN": "hf",
            "AWS_SECRET_ACCESS_KEY": "aws",
            "OPENAI_API_KEY": "oa",
            "DB_PASSWORD": "db",
            "MODE": "fast",
            "TOKENIZERS_PARALLELISM": "false",
        },
    }
    sealed = s.seal_configuration(conf)
    assert sealed["registry_auth"]["username"] == "u" and sealed["model"]["eos_token"] == "</s>"
    assert crypto.is_encrypted(sealed["registry_auth"]["password"])
    assert all(crypto.is_encrypted(v) for v in sealed["env"].values())
    assert s.seal_configuration(sealed) == sealed  # sealing twice changes nothing
    shown = s.redact_configuration(sealed)
    assert shown["registry_auth"] == {"username": "u", "password": "***"}
    assert shown["model"] == conf["model"]  # eos/bos tokens are text, not credentials
    assert shown["env"] == {
        "HF_TOKEN": "***",
        "AWS_SECRET_ACCESS_KEY": "***",
        "OPENAI_API_KEY": "***",
        "DB_PASSWORD": "***",
        "MODE": "fast",
        "TOKENIZERS_PARALLELISM": "false",
    }
    assert s.reveal_env(sealed["env"]) == conf["env"]
    assert s.reveal_registry_auth(sealed) == {"username": "u", "password": "pw"}


def test_rotation_reencrypts_the_database(tmp_path: Path) -> None:
    """`rotate` re-encrypts what is stored, so the old key can go: the server then reads its runs,
    agent and gateways with the new key alone."""
    with running_server(tmp_path) as srv:
        spec = {
            "run_name": "before-rotation",
            "configuration": {
                "type": "task",
                "commands": ["true"],
                "env": {"API_TOKEN": ENV_SECRET, "GREETING": GREETING},
                "resources": SMALL,
            },
        }
        r = httpx.post(f"{srv.url}/api/project/main/runs/submit", json={"run_spec": spec}, headers=srv.headers)
        assert r.status_code == 200, r.text
        agent_json = srv.home / "server" / "local-agent" / "agent.json"
        agent_pid = json.loads(agent_json.read_text())["pid"]
        srv.stop()
        key_file = srv.home / "server" / "encryption.key"
        old_key = key_file.read_text().split()
        out = subprocess.run(
            [sys.executable, "-m", "dstack.server.crypto", "rotate"],
            env=srv.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "re-encrypted" in out.stdout, out.stdout
        keys = key_file.read_text().split()
        assert keys[1:] == old_key and len(keys) == 2
        key_file.write_text(keys[0] + "\n")  # the old key is gone
        assert mode(key_file) == 0o600
        srv.start()
        got = httpx.post(
            f"{srv.url}/api/project/main/runs/get", json={"run_name": "before-rotation"}, headers=srv.headers
        ).json()
        assert got["run_spec"]["configuration"]["env"]["GREETING"] == GREETING  # decrypted with the new key
        # The agent's stored token opened with the new key too: the running agent was reused.
        assert json.loads(agent_json.read_text())["pid"] == agent_pid
        assert "cannot be decrypted" not in srv.logs(tail=10**6)
        client = Client.from_config(project_name="main", server_url=srv.url, user_token=srv.token)
        run = client.runs.submit(
            Task(
                commands=['printf %s "$GREETING" | sha256sum'], env={"GREETING": GREETING}, resources=Resources(**SMALL)
            ),
            run_name="after-rotation",
        )
        out = b"".join(run.logs()).decode()
        assert out.split()[0] == hashlib.sha256(GREETING.encode()).hexdigest(), out
