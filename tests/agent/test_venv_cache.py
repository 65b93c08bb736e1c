"""Shared, prepared venvs keyed by ``venv_key``: a real agent process, real HTTP, a real pip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from dstack.agent import runner
from dstack.agent.launcher import start_agent
from dstack.agent.venvs import LAST_USED, SETUP_LOCK, VenvFactory, last_used
from tests.agent.test_agent import TOKEN, _stop_agent, make_tar, make_wheel, pull, submit, text, wait_final
from tests.util import wait_until

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"
PKG = "dstackheavypkg"
N_MODULES = 300  # enough files that installing (and byte-compiling) them is clearly slower than "already satisfied"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-written pure-Python wheel with many modules (a stand-in for a heavy package)."""
    path = tmp_path_factory.mktemp("wheel") / f"{PKG}-0.1-py3-none-any.whl"
    files = {f"{PKG}/__init__.py": "VALUE = 42\n"}
    for i in range(N_MODULES):
        files[f"{PKG}/m{i}.py"] = "".join(f"def f{j}(x):\n    return x + {j}\n" for j in range(20))
    info = f"{PKG}-0.1.dist-info"
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {PKG}\nVersion: 0.1\n"
    files[f"{info}/WHEEL"] = "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", record)
    return path


def new_key() -> str:
    return uuid.uuid4().hex[:16]


def timed_run(
    client: httpx.Client, commands: list[str], **spec: Any
) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """Run a job; the last stdout line of ``commands`` must be ``time.time()``: returns /start → that."""
    job_id = submit(client, commands, start=False, **spec)
    t0 = time.time()
    assert client.post(f"/api/jobs/{job_id}/start").status_code == 200
    resp, records = wait_final(client, job_id, timeout=120)
    assert resp["state"] == "done", text(records, None)
    return resp, records, float(text(records).splitlines()[-1]) - t0


PROBE = f"python -c 'import {PKG}' 2>/dev/null && echo PRESENT || echo ABSENT"
NOW = "python -c 'import time; print(time.time())'"


def test_second_job_reuses_prepared_venv(client: httpx.Client, home: Path, wheel: Path) -> None:
    key = new_key()
    code = make_tar({wheel.name: wheel.read_bytes()})
    setup = [PROBE, f"pip install --no-index --no-deps ./{wheel.name}"]
    commands = [f"python -c 'import sys, {PKG}; print(sys.prefix); print({PKG}.__file__)'", NOW]
    _, first, first_s = timed_run(client, commands, setup=setup, code=code, venv_key=key)
    _, second, second_s = timed_run(client, commands, setup=setup, code=code, venv_key=key)
    venv = home / "cache" / "venvs" / PY / key
    for records in (first, second):
        out = text(records).splitlines()
        assert out[-3] == str(venv) and out[-2].startswith(f"{venv}/lib/")
    assert text(first).splitlines()[0] == "ABSENT" and "Successfully installed" in text(first)
    assert text(second).splitlines()[0] == "PRESENT" and "already installed" in text(second)
    assert (venv / LAST_USED).exists() and time.time() - last_used(venv) < 60
    assert not (home / "jobs" / "venv").exists()
    print(
        f"\nshared venv, setup = pip install of a {N_MODULES}-module wheel: /start -> commands "
        f"first job {first_s * 1000:.0f} ms, second job {second_s * 1000:.0f} ms"
    )
    assert second_s < first_s


def test_concurrent_jobs_same_key_serialize_setup(client: httpx.Client, home: Path, tmp_path: Path) -> None:
    key = new_key()  # new: both jobs also race to build the venv
    # Jobs run as an unprivileged user (agent.sandbox) and do not see pytest's private tmp_path.
    shared = Path(tempfile.mkdtemp(prefix="dstack-test-"))
    os.chmod(shared, 0o777)
    log = shared / "intervals.txt"
    setup = [
        f'echo "enter $(date +%s.%N)" >> {log}',
        "sleep 1",
        f'echo "exit $(date +%s.%N)" >> {log}',
    ]
    jobs = [submit(client, ["echo ok"], start=False, setup=setup, venv_key=key) for _ in range(2)]
    for job_id in jobs:
        assert client.post(f"/api/jobs/{job_id}/start").status_code == 200
    results = [wait_final(client, job_id) for job_id in jobs]
    for resp, records in results:
        assert resp["state"] == "done", text(records, None)
        assert text(records) == "ok\n"
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["enter", "exit", "enter", "exit"]  # no overlap
    stamps = [float(e[1]) for e in events]
    assert stamps == sorted(stamps) and stamps[2] >= stamps[1]
    waited = [r for _, records in results for r in records if "waiting for another job" in text([r], "stderr")]
    assert len(waited) == 1  # exactly the second one waited, and said so
    assert (home / "cache" / "venvs" / PY / key / "bin" / "python").exists()
    shutil.rmtree(shared, ignore_errors=True)


def test_lock_is_released_after_setup_even_with_background_children(client: httpx.Client) -> None:
    key = new_key()
    # A's setup leaves a background process (it inherits no lock fd) and A's commands keep running.
    a = submit(client, ["echo running", "sleep 30"], setup=["sleep 30 &"], venv_key=key)
    while not pull(client, a, wait=5)["logs"]:
        pass
    t0 = time.monotonic()
    resp, records = wait_final(client, submit(client, ["echo b"], setup=["echo setup-b"], venv_key=key))
    assert resp["state"] == "done" and text(records) == "setup-b\nb\n"
    assert "waiting" not in text(records, "stderr")
    assert time.monotonic() - t0 < 10
    client.post(f"/api/jobs/{a}/stop", json={"abort": True})
    assert wait_final(client, a)[0]["state"] == "aborted"


def test_export_and_cd_in_setup_reach_commands(client: httpx.Client) -> None:
    resp, records = wait_final(
        client,
        submit(client, ["echo $FOO", "pwd"], setup=["export FOO=bar", "mkdir -p sub", "cd sub"], venv_key=new_key()),
    )
    assert resp["state"] == "done", text(records, None)
    foo, pwd = text(records).splitlines()
    assert foo == "bar" and pwd.endswith("/repo/sub")


def test_failing_setup_fails_job_and_frees_the_lock(client: httpx.Client) -> None:
    key = new_key()
    resp, records = wait_final(client, submit(client, ["echo never"], setup=["sh -c 'exit 4'"], venv_key=key))
    assert resp["state"] == "failed" and resp["exit_status"] == 4 and text(records) == ""
    resp, records = wait_final(client, submit(client, ["echo next"], setup=["true"], venv_key=key))
    assert resp["state"] == "done" and text(records) == "next\n" and "waiting" not in text(records, "stderr")


def test_job_without_key_gets_a_fresh_isolated_venv(client: httpx.Client, home: Path, wheel: Path) -> None:
    key = new_key()
    code = make_tar({wheel.name: wheel.read_bytes()})
    resp, records = wait_final(
        client,
        submit(client, [PROBE], setup=[f"pip install -q --no-index --no-deps ./{wheel.name}"], code=code, venv_key=key),
        timeout=120,
    )
    assert resp["state"] == "done" and text(records) == "PRESENT\n", text(records, None)
    job_id = submit(client, [PROBE, 'echo "$VIRTUAL_ENV"'], setup=["true"])
    resp, records = wait_final(client, job_id)
    assert resp["state"] == "done"
    assert text(records).splitlines() == ["ABSENT", str(home / "jobs" / job_id / "venv")]
    script = (home / "jobs" / job_id / "job.sh").read_text()
    assert "flock" not in script and SETUP_LOCK not in script


def test_bad_venv_key_is_rejected(client: httpx.Client) -> None:
    for bad in ("../x", "a/b", ".hidden"):
        r = client.post("/api/jobs", json={"job_id": f"job-{uuid.uuid4().hex[:8]}", "venv_key": bad})
        assert r.status_code == 422, bad


def test_kept_across_restart_and_evicted_after_a_week(tmp_path: Path) -> None:
    home = tmp_path / "home"
    kept, stale = new_key(), new_key()
    wheel = make_wheel(tmp_path)  # a one-module package: dstacktinypkg
    code = make_tar({wheel.name: wheel.read_bytes()})
    probe = "python -c 'import dstacktinypkg' 2>/dev/null && echo PRESENT || echo ABSENT"
    setup = [probe, f"pip install -q --no-index --no-deps ./{wheel.name}"]
    info = start_agent(home, TOKEN)
    try:
        with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            for key in (kept, stale):
                resp, records = wait_final(c, submit(c, ["true"], setup=setup, code=code, venv_key=key), timeout=120)
                assert resp["state"] == "done" and text(records) == "ABSENT\n", text(records, None)
    finally:
        _stop_agent(info)
    root = home / "cache" / "venvs" / PY
    (root / stale / LAST_USED).write_text(f"{time.time() - 8 * 86400}\n")
    (root / kept / LAST_USED).write_text(f"{time.time() - 6 * 86400}\n")
    info = start_agent(home, TOKEN)
    try:
        wait_until(
            lambda: not (root / stale).exists() and not any(p.name.startswith(".trash-") for p in root.iterdir()),
            timeout=15,
            what="the stale shared venv to be evicted",
        )
        assert (root / kept / "bin" / "python").exists()
        with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            resp, records = wait_final(c, submit(c, ["true"], setup=setup, code=code, venv_key=kept), timeout=120)
            assert text(records) == "PRESENT\n"  # the prepared venv outlived the agent
            resp, records = wait_final(c, submit(c, ["true"], setup=setup, code=code, venv_key=stale), timeout=120)
            assert text(records) == "ABSENT\n"  # rebuilt from scratch
    finally:
        _stop_agent(info)
    assert time.time() - last_used(root / kept) < 60


def test_shared_venv_rebuilt_when_half_made(tmp_path: Path) -> None:
    factory = VenvFactory(tmp_path / "cache")
    interp = factory.resolve(None)
    venv = factory.shared(interp, "k1")
    (venv / "lib" / f"python{interp.version}" / "site-packages" / "marker.txt").write_text("x")
    assert (
        factory.shared(interp, "k1") == venv
        and (venv / "lib" / f"python{interp.version}" / "site-packages" / "marker.txt").exists()
    )
    (venv / ".dstack-venv.json").unlink()  # as if an agent died while building it
    assert factory.shared(interp, "k1") == venv
    assert not (venv / "lib" / f"python{interp.version}" / "site-packages" / "marker.txt").exists()
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sys, pip; print(sys.prefix)"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == str(venv)
    assert factory.evict_unused(now=time.time() + 6 * 86400) == []
    assert factory.evict_unused(now=time.time() + 8 * 86400) == [venv] and not venv.exists()


def test_python_lock_fallback_without_flock_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``flock`` binary: the script locks fd 9 with the venv's python and still serialises."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    monkeypatch.setattr(runner.shutil, "which", lambda name, *a, **k: None)
    log = tmp_path / "log.txt"
    script = tmp_path / "job.sh"
    runner.write_script(
        script,
        [f"echo enter >> {log}", "sleep 0.5", f"echo exit >> {log}", "export X=1"],
        ['echo "X=$X"'],
        venv / SETUP_LOCK,
    )
    assert "flock " not in script.read_text() and "fcntl" in script.read_text()
    outs: list[subprocess.CompletedProcess[str]] = []

    def go() -> None:
        outs.append(subprocess.run(["bash", "--noprofile", "--norc", str(script)], capture_output=True, text=True))

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [o.returncode for o in outs] == [0, 0] and [o.stdout for o in outs] == ["X=1\n", "X=1\n"]
    assert log.read_text().split() == ["enter", "exit", "enter", "exit"]
