"""Volumes end to end: a real server (SQLite, or PostgreSQL with DSTACK_TEST_POSTGRES), its agent,
the CLI and HTTP. Data one run writes to a volume is there for the next; a volume takes one run at
a time unless shared; a volume in use cannot be deleted."""

from __future__ import annotations

import base64
import os
import shutil
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
BASE = "/api/project/main/volumes"


def _api(srv: ServerProcess, path: str, body: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {srv.token}"}
    return httpx.post(f"{srv.url}{path}", json=body if body is not None else {}, headers=headers, timeout=60)


def _cli(srv: ServerProcess, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(srv.env)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def _submit(srv: ServerProcess, name: str, commands: list[str], volumes: list[Any], **extra: Any) -> httpx.Response:
    conf = {"type": "task", "name": name, "commands": commands, "volumes": volumes, "resources": SMALL, **extra}
    return _api(srv, "/api/project/main/runs/submit", {"run_spec": {"configuration": conf}})


def _wait(srv: ServerProcess, run_name: str, statuses: tuple[str, ...], timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _api(srv, "/api/project/main/runs/get", {"run_name": run_name}).json()
        if run["status"] in statuses:
            return dict(run)
        time.sleep(0.5)
    raise AssertionError(f"run {run_name} never reached {statuses}")


def _output(srv: ServerProcess, run_name: str) -> str:
    r = _api(srv, "/api/project/main/logs/poll", {"run_name": run_name, "limit": 1000})
    assert r.status_code == 200, r.text
    return b"".join(base64.b64decode(e["message"]) for e in r.json()["logs"]).decode()


def _run_to_end(srv: ServerProcess, name: str, commands: list[str], volumes: list[Any], **extra: Any) -> str:
    r = _submit(srv, name, commands, volumes, **extra)
    assert r.status_code == 200, r.text
    run = _wait(srv, name, ("done", "failed", "terminated"))
    out = _output(srv, name)
    assert run["status"] == "done", (run.get("status"), run.get("termination_reason"), out)
    return out


def _create(srv: ServerProcess, tmp_path: Path, name: str, extra: str = "") -> None:
    f = tmp_path / f"{name}.dstack.yml"
    f.write_text(f"type: volume\nname: {name}\nbackend: local\nsize: 1GB\n{extra}")
    r = _cli(srv, "apply", "-f", str(f), "-y", cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"volume {name} ready" in r.stdout


def _stop(srv: ServerProcess, *names: str) -> None:
    r = _api(srv, "/api/project/main/runs/stop", {"runs_names": list(names), "abort": True})
    assert r.status_code == 200, r.text
    for n in names:
        _wait(srv, n, ("done", "failed", "terminated"))


def test_data_written_by_one_run_is_there_for_the_next(server: ServerProcess, tmp_path: Path) -> None:
    _create(server, tmp_path, "keep")
    again = _cli(server, "apply", "-f", str(tmp_path / "keep.dstack.yml"), "-y", cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # applying it unchanged again is fine
    listing = _cli(server, "volume")
    assert listing.returncode == 0 and "keep" in listing.stdout and "1GB" in listing.stdout, listing.stdout

    mark = uuid.uuid4().hex
    # An instance path too: a host directory others may read (the job runs as an unprivileged user).
    host_dir = Path(f"/tmp/dstack-vol-test-{mark[:8]}")
    host_dir.mkdir(mode=0o755)
    try:
        (host_dir / "in.txt").write_text(f"from-host-{mark}\n")
        os.chmod(host_dir / "in.txt", 0o644)
        writer = f"w-{mark[:6]}"
        _run_to_end(
            server,
            writer,
            [f"echo {mark} > /data/note.txt", "cat /host/in.txt", "mkdir -p /data/sub && echo deep > /data/sub/x"],
            ["keep:/data", f"{host_dir}:/host"],
        )
        assert f"from-host-{mark}" in _output(server, writer)
        reader = f"r-{mark[:6]}"  # the next run, with the volume at another path
        out = _run_to_end(
            server, reader, ["cat /mnt/other/note.txt /mnt/other/sub/x"], [{"name": "keep", "path": "/mnt/other"}]
        )
        assert f"{mark}\ndeep\n" in out, out
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def test_one_run_at_a_time_and_no_delete_while_attached(server: ServerProcess, tmp_path: Path) -> None:
    _create(server, tmp_path, "solo")
    holder = f"hold-{uuid.uuid4().hex[:6]}"
    r = _submit(server, holder, ["echo up", "sleep 300"], ["solo:/data"])
    assert r.status_code == 200, r.text
    try:
        _wait(server, holder, ("running",))
        second = _submit(server, f"two-{uuid.uuid4().hex[:6]}", ["true"], ["solo:/other"])
        assert second.status_code == 400, second.text
        msg = second.json()["detail"][0]["msg"]
        assert f"volume 'solo' is attached to run {holder}" in msg and "shared" in msg, msg

        deleted = _api(server, f"{BASE}/delete", {"names": ["solo"]})
        assert deleted.status_code == 400, deleted.text
        assert f"'solo' is attached to run {holder}" in deleted.json()["detail"][0]["msg"]
        cli = _cli(server, "volume", "delete", "solo", "-y")
        assert cli.returncode != 0 and holder in cli.stderr + cli.stdout
        listing = _cli(server, "volume", "list")
        assert holder in listing.stdout, listing.stdout  # ATTACHED TO
        got = _api(server, f"{BASE}/get", {"name": "solo"}).json()
        assert got["attached_to"] == [holder]
    finally:
        _stop(server, holder)
    # Free again: another run may attach it, and it may be deleted (with its data).
    volume_id = _api(server, f"{BASE}/get", {"name": "solo"}).json()["id"]
    data_dir = next(server.home.rglob(f"volumes/{volume_id}"))
    assert data_dir.is_dir()
    r = _cli(server, "volume", "delete", "solo", "-y")
    assert r.returncode == 0, r.stderr
    assert not data_dir.exists()
    assert _api(server, f"{BASE}/get", {"name": "solo"}).status_code == 404
    unknown = _submit(server, f"u-{uuid.uuid4().hex[:6]}", ["true"], ["solo:/data"])
    assert unknown.status_code == 400 and "volume 'solo' does not exist" in unknown.text


def test_a_shared_volume_takes_several_runs(server: ServerProcess, tmp_path: Path) -> None:
    _create(server, tmp_path, "common", "shared: true\n")
    names = [f"sh{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
    try:
        for n in names:
            r = _submit(server, n, ["sleep 300"], ["common:/data"])
            assert r.status_code == 200, r.text
        got = _api(server, f"{BASE}/get", {"name": "common"}).json()
        assert sorted(got["attached_to"]) == sorted(names)
    finally:
        _stop(server, *names)


def test_api_refuses_bad_configurations(server: ServerProcess) -> None:
    r = _api(server, f"{BASE}/create", {"configuration": {"type": "volume", "name": "x", "backend": "gcp"}})
    assert r.status_code == 400 and "unknown volume backend 'gcp'" in r.text, r.text
    assert r.json()["detail"][0]["fields"] == ["configuration.backend"]
    r = _api(
        server, f"{BASE}/create", {"configuration": {"type": "volume", "name": "x", "volume_id": "/nonexistent/d"}}
    )
    assert r.status_code == 400 and "not an existing directory" in r.text, r.text
    _api(server, f"{BASE}/create", {"configuration": {"type": "volume", "name": "twice"}})
    r = _api(server, f"{BASE}/create", {"configuration": {"type": "volume", "name": "twice", "size": "5GB"}})
    assert r.status_code == 409 and "another configuration" in r.text, r.text
    assert _api(server, f"{BASE}/delete", {"names": ["nope"]}).status_code == 404


def test_a_container_job_sees_the_volume(server: ServerProcess, tmp_path: Path) -> None:
    from tests.images import ensure_test_image

    image = ensure_test_image()
    _create(server, tmp_path, "boxed")
    mark = uuid.uuid4().hex
    _run_to_end(server, f"c-{mark[:6]}", [f"echo {mark} > /data/from-container.txt"], ["boxed:/data"], image=image)
    out = _run_to_end(server, f"h-{mark[:6]}", ["cat /vol/from-container.txt"], ["boxed:/vol"])
    assert mark in out, out


@pytest.mark.slow  # starts its own server/agent process
def test_volumes_without_job_isolation(tmp_path: Path) -> None:
    """A root agent whose jobs are not isolated still gives each job its own mount namespace."""
    if os.geteuid() != 0:
        pytest.skip("needs root: without it the agent refuses volumes for host jobs (no mount namespace)")
    with running_server(tmp_path, DSTACK_AGENT_NO_ISOLATION="1") as srv:
        _create(srv, tmp_path, "plain")
        mark = uuid.uuid4().hex
        _run_to_end(srv, f"pw-{mark[:6]}", [f"echo {mark} > /data/x", "id -u"], ["plain:/data"])
        assert "0\n" in _output(srv, f"pw-{mark[:6]}")  # ran as the agent's user: not isolated
        out = _run_to_end(srv, f"pr-{mark[:6]}", ["cat /elsewhere/x"], ["plain:/elsewhere"])
        assert mark in out, out
        assert not Path("/data/x").exists()  # the mount was the job's alone


def test_the_size_is_enforced_where_the_host_can(server: ServerProcess, tmp_path: Path) -> None:
    from dstack.agent import volume_image

    why = volume_image.why_not_enforced()
    if why is not None:
        pytest.skip(f"sizes cannot be enforced here: {why}")
    _create(server, tmp_path, "tiny", extra="")  # 1GB: enforced, listed so
    assert "1GB" in _cli(server, "volume").stdout and "not enforced" not in _cli(server, "volume").stdout
    r = _api(server, f"{BASE}/create", {"configuration": {"type": "volume", "name": "small", "size": "16MB"}})
    assert r.status_code == 200 and r.json()["size_enforced"] is True, r.text
    name = f"fill-{uuid.uuid4().hex[:6]}"
    out = _run_to_end(
        server,
        name,
        [
            "dd if=/dev/zero of=/data/a bs=1M count=8 2>/dev/null && echo first-fits",
            "dd if=/dev/zero of=/data/b bs=1M count=32 2>&1 | grep -o 'No space left on device' | head -1",
            "df -k /data | tail -1",
        ],
        ["small:/data"],
    )
    assert "first-fits" in out and "No space left on device" in out, out
    volume_id = _api(server, f"{BASE}/get", {"name": "small"}).json()["id"]
    data_dir = next(server.home.rglob(f"volumes/{volume_id}"))
    assert os.path.ismount(data_dir)
    assert _api(server, f"{BASE}/delete", {"names": ["small", "tiny"]}).status_code == 200
    assert not data_dir.exists() and not volume_image.image_path(data_dir).exists()


def test_concurrent_submissions_get_one_attachment(server: ServerProcess, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    if not (server.database_url or "").startswith("postgresql"):
        pytest.skip("SQLite ignores FOR UPDATE: racing submissions may both pass there (docs/architecture.md)")
    _create(server, tmp_path, "race")
    names = [f"race{i}-{uuid.uuid4().hex[:6]}" for i in range(4)]
    with ThreadPoolExecutor(len(names)) as pool:
        answers = list(pool.map(lambda n: _submit(server, n, ["sleep 300"], ["race:/data"]), names))
    accepted = [n for n, r in zip(names, answers, strict=True) if r.status_code == 200]
    try:
        assert len(accepted) == 1, [(r.status_code, r.text[:200]) for r in answers]
        assert all("is attached to run" in r.text for r in answers if r.status_code != 200)
    finally:
        _stop(server, *accepted)
