"""The agent's sandbox (agent.sandbox): a real agent as root runs each project's jobs as a user
of its own, with a private /proc view and only its own files reachable; off by
DSTACK_AGENT_NO_ISOLATION."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import httpx
import pytest

from dstack.agent.launcher import start_agent
from tests.agent.test_agent import TOKEN, _stop_agent, make_tar, run, submit, text, wait_final

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or os.geteuid() != 0
    or not (shutil.which("unshare") and shutil.which("setpriv")),
    reason="jobs run as other users only where the agent runs as root on Linux with util-linux (unshare, setpriv)",
)


def test_host_reports_job_isolation(client: httpx.Client) -> None:
    assert client.get("/api/host").json()["job_isolation"] is True


def test_projects_get_distinct_unprivileged_users(client: httpx.Client, home: Path) -> None:
    ids = {}
    for project in ("proj-a", "proj-b", "proj-a"):
        resp, records = run(client, ["id -u", "id -G"], project_id=project)
        assert resp["state"] == "done", text(records, None)
        uid, groups = text(records).split("\n", 1)
        assert int(uid) != 0 and groups.split() == [uid]  # no supplementary groups (root's are gone)
        assert ids.setdefault(project, uid) == uid
    assert ids["proj-a"] != ids["proj-b"]
    table = home / "users.json"
    assert oct(table.stat().st_mode & 0o777) == "0o600"
    assert {str(v) for v in json.loads(table.read_text()).values()} >= set(ids.values())


def test_agent_files_are_out_of_reach(client: httpx.Client, home: Path) -> None:
    other, _ = run(client, ["echo other-project-output > mine.txt", "echo other-project-output"], project_id="p-other")
    other_dir = next(d for d in (home / "jobs").iterdir() if (d / "repo" / "mine.txt").exists())
    targets = [
        home / "agent.json",
        home / "agent.log",
        home / "users.json",
        other_dir / "logs.jsonl",
        other_dir / "state.json",
        other_dir / "repo" / "mine.txt",
    ]
    resp, records = run(
        client,
        [f"cat {t} 2>&1 || true" for t in targets]
        + [f"ls {home} {home / 'jobs'} 2>&1 || true", "ls /proc/1/environ 2>&1 || true"],
        project_id="p-reader",
    )
    out = text(records, None)
    assert TOKEN not in out and "other-project-output" not in out
    assert out.count("No such file or directory") + out.count("Permission denied") >= len(targets) + 2, out


def test_proc_shows_only_the_users_processes(client: httpx.Client) -> None:
    sleeper = submit(client, ["sleep 120"], env={"OTHER_SECRET": "s3cr3t-value"}, project_id="p-sleeper")
    try:
        resp, records = run(
            client, ["cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'; ps -eo args"], project_id="p-looker"
        )
        out = text(records, None)
        assert "s3cr3t-value" not in out and "sleep 120" not in out
        assert "ps -eo args" in out
    finally:
        client.post(f"/api/jobs/{sleeper}/stop", json={"abort": True})
        wait_final(client, sleeper)


def test_working_dir_is_the_users_and_symlinks_do_not_lead_out(client: httpx.Client, tmp_path: Path) -> None:
    resp, records = run(
        client,
        ["pwd", "touch made-here", "stat -c %u . made-here", "echo $HOME; stat -c '%u %a' $HOME"],
        code=make_tar({"a.txt": b"a"}),
        working_dir="sub/dir",
        project_id="p-wd",
    )
    assert resp["state"] == "done", text(records, None)
    pwd, uid1, uid2, home_dir, home_stat = text(records).split("\n")[:5]
    assert pwd.endswith("/repo/sub/dir") and uid1 == uid2 != "0"
    assert home_stat == f"{uid1} 700" and home_dir.endswith(f"/users/{uid1}")
    # a working_dir outside the code must exist: the agent makes no directories for the job as root
    target = tmp_path / "not-made"
    resp, records = run(client, ["pwd"], working_dir=str(target), project_id="p-wd")
    assert resp["state"] == "failed" and "does not exist" in resp["message"]
    assert not target.exists()


def test_shared_venv_belongs_to_the_project(client: httpx.Client, home: Path) -> None:
    for project in ("p-venv", "p-venv2"):
        resp, records = run(
            client,
            ["python -c 'import sys; print(sys.prefix)'", "touch $VIRTUAL_ENV/written", "stat -c %u $VIRTUAL_ENV"],
            setup=["true"],
            venv_key="shared-k",
            project_id=project,
        )
        assert resp["state"] == "done", text(records, None)
        prefix, owner = text(records).split()
        assert Path(prefix).name.startswith("shared-k") and owner != "0"
        assert Path(prefix).stat().st_mode & 0o777 == 0o700  # other projects cannot read what setup put there
    # the second project got a venv of its own, not write access to the first's
    assert len(list((home / "cache" / "venvs").glob("*/shared-k*"))) == 2


def test_two_agents_on_one_host_never_share_a_uid(client: httpx.Client, tmp_path: Path) -> None:
    resp, records = run(client, ["id -u"], project_id="same-name")
    first = text(records).strip()
    info = start_agent(tmp_path / "home2", TOKEN)
    try:
        with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            resp, records = run(c, ["id -u"], project_id="same-name")
            assert resp["state"] == "done", text(records, None)
            assert text(records).strip() not in (first, "0")
    finally:
        _stop_agent(info)


def test_job_submitted_before_an_agent_restart_still_runs_isolated(tmp_path: Path) -> None:
    home = tmp_path / "home"
    info = start_agent(home, TOKEN)
    with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
        job_id = submit(
            c,
            ["id -u", "cat hello.txt"],
            code=make_tar({"hello.txt": b"hi\n"}),
            start=False,
            env={"X": "1"},
            project_id="p-restart",
        )
    _stop_agent(info)
    info = start_agent(home, TOKEN)
    try:
        with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            assert c.post(f"/api/jobs/{job_id}/start").status_code == 200
            resp, records = wait_final(c, job_id)
            assert resp["state"] == "done", text(records, None)
            uid, hello = text(records).split()
            assert uid != "0" and hello == "hi"
    finally:
        _stop_agent(info)


def test_no_isolation_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSTACK_AGENT_NO_ISOLATION", "1")
    info = start_agent(tmp_path / "home", TOKEN)
    try:
        with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            assert c.get("/api/host").json()["job_isolation"] is False
            resp, records = run(c, ["id -u"], project_id="p")
            assert text(records) == "0\n"
    finally:
        _stop_agent(info)
