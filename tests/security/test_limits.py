"""Finding 6 of issue 10: documented limits (README "Limits") with clear errors.

Runs may not ask for more nodes, replicas or workers than the server allows; a project's active
jobs have a quota; request bodies, code archives (compressed, extracted, file count) and YAML
documents (alias expansion, nesting) are bounded, and each refusal says which limit it hit.
"""

from __future__ import annotations

import gzip
import io
import os
import sqlite3
import tarfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from dstack.core.archives import ArchiveTooLarge, ExtractBudget
from dstack.core.errors import ConfigurationError
from dstack.core.yaml_loader import MAX_YAML_DEPTH, MAX_YAML_NODES, load_configuration
from tests.cli.test_cli_e2e import dstack
from tests.conftest import running_server
from tests.security.helpers import create_project, create_user, detail, post, run_names, task_spec
from tests.util import wait_until

LIMITS_ENV = {
    "DSTACK_SERVER_MAX_NODES": "4",
    "DSTACK_SERVER_MAX_REPLICAS": "3",
    "DSTACK_SERVER_MAX_WORKERS": "2",
    "DSTACK_SERVER_MAX_ACTIVE_JOBS_PER_PROJECT": "3",
    "DSTACK_SERVER_MAX_BODY_SIZE": str(64 * 1024),
    "DSTACK_SERVER_CODE_UPLOAD_LIMIT": str(256 * 1024),
    "DSTACK_SERVER_CODE_EXTRACTED_LIMIT": str(1024 * 1024),
    "DSTACK_SERVER_CODE_MAX_FILES": "100",
}


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A server with small limits, so tests can reach them."""
    with running_server(tmp_path_factory.mktemp("limited"), **LIMITS_ENV) as srv:
        yield srv


@pytest.fixture(scope="module")
def dave(limited):
    token = create_user(limited, "dave-" + uuid.uuid4().hex[:6])
    project = "daves-" + uuid.uuid4().hex[:6]
    create_project(limited, project, token)
    return token, project


# --- per-run sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conf,field,setting",
    [
        ({"nodes": 5}, "nodes", "DSTACK_SERVER_MAX_NODES"),
        (
            {"type": "service", "port": 80, "replicas": "0..4", "scaling": {"target": 1}},
            "replicas",
            "DSTACK_SERVER_MAX_REPLICAS",
        ),
        ({"type": "serverless", "workers": "0..3"}, "workers", "DSTACK_SERVER_MAX_WORKERS"),
    ],
)
def test_run_sizes_over_the_server_limits_are_refused(limited, dave, conf, field, setting):
    token, project = dave
    for op in ("get_plan", "submit"):
        resp = post(limited, f"/api/project/{project}/runs/{op}", {"run_spec": task_spec(**conf)}, token=token)
        assert resp.status_code == 400, resp.text
        msg = detail(resp)
        assert msg.startswith(f"{field}:") and setting in msg, msg
    assert run_names(limited, project, token) == []


@pytest.mark.parametrize(
    "conf,field",
    [
        ({"nodes": 65}, "DSTACK_SERVER_MAX_NODES"),
        ({"type": "service", "port": 80, "replicas": 65}, "DSTACK_SERVER_MAX_REPLICAS"),
        ({"type": "serverless", "workers": "0..65"}, "DSTACK_SERVER_MAX_WORKERS"),
        ({"nodes": 2000}, "less than or equal to 1000"),
        ({"type": "service", "port": 80, "replicas": 500}, "DSTACK_SERVER_MAX_REPLICAS"),
    ],
)
def test_default_limits_are_64_per_run(server, conf, field):
    resp = post(server, "/api/project/main/runs/submit", {"run_spec": task_spec(**conf)})
    assert resp.status_code == 400, resp.text
    assert field in detail(resp)


# --- per-project quota -----------------------------------------------------------------------


def test_active_jobs_quota_per_project(limited, dave):
    token, project = dave
    sleeper = task_spec(commands=["sleep 300"])
    resp = post(
        limited,
        f"/api/project/{project}/runs/submit",
        {"run_spec": {**sleeper, "configuration": {**sleeper["configuration"], "nodes": 4}}},
        token=token,
    )
    assert resp.status_code == 429, resp.text
    assert "quota of 3" in detail(resp) and "DSTACK_SERVER_MAX_ACTIVE_JOBS_PER_PROJECT" in detail(resp)
    names = []
    try:
        for _ in range(3):
            resp = post(limited, f"/api/project/{project}/runs/submit", {"run_spec": sleeper}, token=token)
            assert resp.status_code == 200, resp.text
            names.append(resp.json()["run_name"])
        resp = post(limited, f"/api/project/{project}/runs/submit", {"run_spec": sleeper}, token=token)
        assert resp.status_code == 429, resp.text
        assert "has 3 active jobs" in detail(resp)
        assert sorted(run_names(limited, project, token)) == sorted(names)
        # another user's project is not held back by this one's quota
        erin = create_user(limited, "erin-" + uuid.uuid4().hex[:6])
        other = "erins-" + uuid.uuid4().hex[:6]
        create_project(limited, other, erin)
        resp = post(limited, f"/api/project/{other}/runs/submit", {"run_spec": task_spec()}, token=erin)
        assert resp.status_code == 200, resp.text
    finally:
        post(limited, f"/api/project/{project}/runs/stop", {"runs_names": names, "abort": True}, token=token)

    # once they have stopped, the quota is free again
    def submitted() -> httpx.Response | None:
        resp = post(limited, f"/api/project/{project}/runs/submit", {"run_spec": task_spec()}, token=token)
        assert resp.status_code in (200, 429), resp.text
        return resp if resp.status_code == 200 else None

    resp = wait_until(submitted, 60, 0.5, "the quota to be free again")
    assert resp.status_code == 200, resp.text


# --- request bodies --------------------------------------------------------------------------


def test_body_over_the_limit_is_a_413(limited, dave):
    token, project = dave
    big = b'{"only_active": false, "pad": "' + b"x" * (70 * 1024) + b'"}'
    resp = post(limited, f"/api/project/{project}/runs/list", raw=big, token=token)
    assert resp.status_code == 413, resp.text
    assert "0.0625 MiB" in detail(resp)

    def chunks():  # no Content-Length: the limit applies as the body arrives
        for _ in range(100):
            yield b" " * 1024

    resp = httpx.post(
        f"{limited.url}/api/project/{project}/runs/list",
        content=chunks(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 413, resp.text
    assert resp.json()["detail"][0]["code"] == "too_large"
    small = post(limited, f"/api/project/{project}/runs/list", {"only_active": False}, token=token)
    assert small.status_code == 200


# --- code archives ---------------------------------------------------------------------------


def _tar_gz(files: dict[str, int]) -> bytes:
    """A .tar.gz of files of zeros of the given sizes (compresses ~1000:1)."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, size in files.items():
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
    return buf.getvalue()


def _codes_stored(srv) -> int | None:
    if srv.database_url:
        return None
    with sqlite3.connect(srv.home / "server" / "data" / "sqlite.db") as db:
        return db.execute("select count(*) from codes").fetchone()[0]


@pytest.mark.parametrize(
    "blob,status,words",
    [
        (_tar_gz({"zeros.bin": 10 * 1024 * 1024}), 400, "extracts to more than 1 MiB"),
        (_tar_gz({f"f{i}": 1 for i in range(101)}), 400, "more than 100 files"),
        (os.urandom(300 * 1024), 413, "DSTACK_SERVER_CODE_UPLOAD_LIMIT"),
        (b"not a tar archive at all", 400, "not a readable tar archive"),
    ],
    ids=["bomb", "many-files", "compressed-too-big", "garbage"],
)
def test_code_upload_limits(limited, dave, blob, status, words):
    token, project = dave
    before = _codes_stored(limited)
    resp = post(
        limited,
        f"/api/project/{project}/repos/upload_code",
        raw=blob,
        token=token,
        params={"repo_id": "repo-1"},
        headers={"Content-Type": "application/octet-stream"},
    )
    assert resp.status_code == status, resp.text
    assert words in detail(resp)
    assert _codes_stored(limited) == before
    ok = post(
        limited,
        f"/api/project/{project}/repos/upload_code",
        raw=_tar_gz({"a.py": 100}),
        token=token,
        params={"repo_id": "repo-1"},
        headers={"Content-Type": "application/octet-stream"},
    )
    assert ok.status_code == 200, ok.text


def test_agent_stops_extracting_at_the_first_member_over_budget(tmp_path):
    from dstack.agent.runner import safe_extract

    archive = tmp_path / "code.tar.gz"
    archive.write_bytes(_tar_gz({"small.txt": 10, "zeros.bin": 50 * 1024 * 1024, "after.txt": 10}))
    dest = tmp_path / "repo"
    with pytest.raises(ArchiveTooLarge, match="extracts to more than 1 MiB"):
        safe_extract(archive, dest, ExtractBudget(max_bytes=1024 * 1024, max_files=100))
    assert sorted(p.name for p in dest.iterdir()) == ["small.txt"]  # nothing at or after the bomb
    archive.write_bytes(_tar_gz({f"f{i}": 1 for i in range(20)}))
    with pytest.raises(ArchiveTooLarge, match="more than 5 files"):
        safe_extract(
            archive, tmp_path / "repo2", ExtractBudget.from_env("DSTACK_AGENT", {"DSTACK_AGENT_CODE_MAX_FILES": "5"})
        )
    assert len(list((tmp_path / "repo2").iterdir())) == 5


# --- YAML ------------------------------------------------------------------------------------


def _billion_laughs(path: Path) -> Path:
    lines = [
        "type: task",
        "commands: [echo hi]",
        'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
    ]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_yaml_alias_bomb_is_refused_at_once_with_file_and_line(tmp_path):
    path = _billion_laughs(tmp_path / "bomb.dstack.yml")
    started = time.monotonic()
    with pytest.raises(ConfigurationError) as err:
        load_configuration(path)
    assert time.monotonic() - started < 5
    assert str(err.value).startswith(f"{path}:8: invalid YAML: the document expands to more than {MAX_YAML_NODES}")
    assert err.value.line == 8  # a5: 9**5 * 10 values, the first entry over the limit


def test_yaml_nesting_and_recursion_are_refused_with_file_and_line(tmp_path):
    deep = tmp_path / "deep.dstack.yml"
    deep.write_text("type: task\ncommands: [echo]\nenv:\n  X: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigurationError) as err:
        load_configuration(deep)
    assert f"{deep}:4: invalid YAML: nesting deeper than {MAX_YAML_DEPTH} levels" in str(err.value)
    ok = tmp_path / "ok.dstack.yml"  # nesting up to the limit is fine for YAML (the model decides the rest)
    ok.write_text("type: task\ncommands: [echo]\nx: " + "[" * (MAX_YAML_DEPTH - 1) + "]" * (MAX_YAML_DEPTH - 1) + "\n")
    with pytest.raises(ConfigurationError, match="unknown field 'x'"):
        load_configuration(ok)
    rec = tmp_path / "rec.dstack.yml"
    rec.write_text("type: task\ncommands: [echo]\nsetup: &s [*s]\n")
    with pytest.raises(ConfigurationError, match=r"rec.dstack.yml:3: invalid YAML: an alias refers to the node"):
        load_configuration(rec)


def test_cli_apply_of_an_alias_bomb_fails_fast(server, tmp_path):
    path = _billion_laughs(tmp_path / ".dstack.yml")
    started = time.monotonic()
    result = dstack(server, "apply", "-f", str(path), "-y", "-d", cwd=tmp_path, timeout=60)
    assert result.returncode != 0
    assert "expands to more than" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 30
