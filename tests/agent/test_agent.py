"""End-to-end tests of the agent: a real agent process on a free port, real HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from dstack.agent.host_info import parse_nvidia_smi
from dstack.agent.launcher import AgentInfo, is_agent_alive, start_agent
from tests.util import alive, wait_until

FINAL = {"done", "failed", "terminated", "aborted"}
TOKEN = "test-token"


def wait_gone(pid: int, timeout: float = 10) -> None:
    """Wait for a killed process to end; one already gone (and reaped) is fine."""
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass


def _stop_agent(info: AgentInfo) -> None:
    try:
        os.kill(info.pid, signal.SIGTERM)
        wait_gone(info.pid)
    except (ProcessLookupError, psutil.Error):
        pass


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def submit(
    client: httpx.Client, commands: list[str], code: bytes | None = None, start: bool = True, **spec: Any
) -> str:
    job_id = spec.pop("job_id", None) or f"job-{uuid.uuid4().hex[:12]}"
    r = client.post("/api/jobs", json={"job_id": job_id, "run_name": "test", "commands": commands, **spec})
    assert r.status_code == 200, r.text
    if code is not None:
        r = client.put(f"/api/jobs/{job_id}/code", content=code)
        assert r.status_code == 200, r.text
    if start:
        r = client.post(f"/api/jobs/{job_id}/start")
        assert r.status_code == 200, r.text
    return job_id


def pull(client: httpx.Client, job_id: str, cursor: int = 0, **params: Any) -> dict[str, Any]:
    r = client.get(f"/api/jobs/{job_id}/pull", params={"cursor": cursor, **params})
    assert r.status_code == 200, r.text
    return r.json()


def wait_final(client: httpx.Client, job_id: str, timeout: float = 30) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Pull until a final state with no more logs; returns the last answer and all records."""
    records: list[dict[str, Any]] = []
    cursor, state = 0, None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        params: dict[str, Any] = {"wait": 5, "limit": 5000}
        if state is not None:
            params["known_state"] = state
        resp = pull(client, job_id, cursor, **params)
        records += resp["logs"]
        cursor, state = resp["next_cursor"], resp["state"]
        if state in FINAL and not resp["logs"]:
            return resp, records
    raise AssertionError(f"job {job_id} did not finish; state {state}")


def text(records: list[dict[str, Any]], stream: str | None = "stdout") -> str:
    return b"".join(base64.b64decode(r["data"]) for r in records if stream is None or r["stream"] == stream).decode()


def run(client: httpx.Client, commands: list[str], **spec: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return wait_final(client, submit(client, commands, **spec))


def test_echo_hi(client: httpx.Client) -> None:
    resp, records = run(client, ["echo hi"], code=make_tar({}))
    assert resp["state"] == "done" and resp["exit_status"] == 0
    assert text(records) == "hi\n"
    assert [r["seq"] for r in records] == [1]
    assert resp["started_at"] and resp["finished_at"] >= resp["started_at"]


def test_nonzero_exit_stops_at_failing_line(client: httpx.Client) -> None:
    resp, records = run(client, ["echo before", "sh -c 'exit 3'", "echo after"])
    assert resp["state"] == "failed" and resp["exit_status"] == 3
    assert text(records) == "before\n"


def test_setup_and_commands_share_one_shell(client: httpx.Client) -> None:
    resp, records = run(client, ["echo $FOO", "pwd"], setup=["export FOO=bar", "mkdir -p sub", "cd sub"])
    assert resp["state"] == "done"
    foo, pwd = text(records).splitlines()
    assert foo == "bar" and pwd.endswith("/repo/sub")


def test_env_and_no_leaks(client: httpx.Client) -> None:
    commands = [
        'echo "MY=$MY_VAR"',
        'echo "CUDA=$CUDA_VISIBLE_DEVICES"',
        'echo "PP=${PYTHONPATH-unset}"',
        'echo "VE=$VIRTUAL_ENV"',
        'echo "DS=$DSTACK_RUN_NAME"',
    ]
    resp, records = run(client, commands, env={"MY_VAR": "x y", "DSTACK_RUN_NAME": "r1"}, gpus=[0, 2])
    lines = text(records).splitlines()
    assert lines[:3] == ["MY=x y", "CUDA=0,2", "PP=unset"]  # PYTHONPATH is set for the agent, not the job
    assert lines[3].startswith("VE=") and lines[3].endswith("/venv") and "/jobs/" in lines[3]
    assert lines[4] == "DS=r1"
    _, records = run(client, ['echo "[$CUDA_VISIBLE_DEVICES]"'])
    assert text(records) == "[]\n"


def test_code_and_working_dir(client: httpx.Client) -> None:
    code = make_tar({"sub/dir/hello.txt": b"hello from code\n", "top.txt": b"top\n"})
    resp, records = run(client, ["cat hello.txt", "cat ../../top.txt"], code=code, working_dir="sub/dir")
    assert resp["state"] == "done", text(records, None)
    assert text(records) == "hello from code\ntop\n"


def test_code_archive_cannot_escape(client: httpx.Client, home: Path) -> None:
    job_id = submit(client, ["true"], start=False)
    r = client.put(f"/api/jobs/{job_id}/code", content=make_tar({"../escaped.txt": b"x"}))
    assert r.status_code == 400
    assert not (home / "jobs" / job_id / "escaped.txt").exists()


def test_many_lines_intact_and_ordered(client: httpx.Client) -> None:
    n = 20000
    t0 = time.monotonic()
    resp, records = run(client, [f"seq 1 {n}", "echo to-stderr >&2"], timeout=60)
    elapsed = time.monotonic() - t0
    assert resp["state"] == "done"
    # Dense sequence numbers; on a loaded host a line split across pipe reads may be flushed as
    # two records (the 50 ms partial-line flush), so compare the text, not the record count.
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert text(records) == "".join(f"{i}\n" for i in range(1, n + 1))
    assert text(records, "stderr") == "to-stderr\n"
    print(f"\n{n} lines stored and pulled in {elapsed:.2f} s")


def test_old_records_served_from_file(client: httpx.Client) -> None:
    n = 12000  # more than the in-memory window
    job_id = submit(client, [f"seq 1 {n}"])
    wait_final(client, job_id)
    resp = pull(client, job_id, cursor=10, limit=3)
    assert [r["seq"] for r in resp["logs"]] == [11, 12, 13]
    assert text(resp["logs"]) == "11\n12\n13\n" and resp["next_cursor"] == 13
    assert pull(client, job_id, cursor=n)["logs"] == []


def test_partial_line_is_flushed(client: httpx.Client) -> None:
    job_id = submit(client, ["printf partial", "sleep 2", "echo ' done'"])
    deadline = time.monotonic() + 10
    seen: list[dict[str, Any]] = []
    while not seen and time.monotonic() < deadline:
        seen = pull(client, job_id, wait=5)["logs"]
    assert text(seen) == "partial"
    assert pull(client, job_id)["state"] == "running"
    _, records = wait_final(client, job_id)
    assert text(records) == "partial done\n"


def test_long_poll_wakes_quickly(client: httpx.Client) -> None:
    job_id = submit(client, ["echo first", "sleep 1", "echo second", "sleep 30"])
    cursor = 0
    while cursor == 0:
        cursor = pull(client, job_id, wait=5)["next_cursor"]
    t0 = time.monotonic()
    resp = pull(client, job_id, cursor=cursor, known_state="running", wait=20)
    received = time.time()
    assert text(resp["logs"]) == "second\n"
    delay_ms = (received - resp["logs"][0]["ts"]) * 1000
    assert time.monotonic() - t0 < 5
    t0 = time.monotonic()
    client.post(f"/api/jobs/{job_id}/stop", json={"abort": True})
    resp = pull(client, job_id, cursor=resp["next_cursor"], known_state="running", wait=20)
    assert resp["state"] == "aborted" and time.monotonic() - t0 < 5
    print(f"\nlong poll answered {delay_ms:.1f} ms after the line was read")


def test_stop_terminates(client: httpx.Client) -> None:
    job_id = submit(client, ["echo started", "sleep 30"])
    while not pull(client, job_id, wait=5)["logs"]:
        pass
    t0 = time.monotonic()
    assert client.post(f"/api/jobs/{job_id}/stop", json={"abort": False}).status_code == 200
    resp, _ = wait_final(client, job_id)
    assert resp["state"] == "terminated"
    assert time.monotonic() - t0 < 5


def test_abort_before_and_while_running(client: httpx.Client) -> None:
    job_id = submit(client, ["sleep 30"], start=False)
    client.post(f"/api/jobs/{job_id}/stop", json={"abort": True})
    assert pull(client, job_id)["state"] == "aborted"
    job_id = submit(client, ["echo started", "sleep 30"])
    while not pull(client, job_id, wait=5)["logs"]:
        pass
    client.post(f"/api/jobs/{job_id}/stop", json={"abort": True})
    resp, _ = wait_final(client, job_id)
    assert resp["state"] == "aborted" and resp["exit_status"] == 128 + signal.SIGKILL


def test_grace_period_then_sigkill(client: httpx.Client) -> None:
    job_id = submit(client, ["trap '' TERM", "echo ready", "sleep 30"], stop_grace_seconds=1)
    while not pull(client, job_id, wait=5)["logs"]:
        pass
    t0 = time.monotonic()
    client.post(f"/api/jobs/{job_id}/stop", json={"abort": False})
    resp, _ = wait_final(client, job_id)
    elapsed = time.monotonic() - t0
    assert resp["state"] == "terminated"
    assert 0.9 <= elapsed < 6
    assert "grace" in (resp["message"] or "")


def test_missing_python_version(client: httpx.Client) -> None:
    resp, _ = run(client, ["echo never"], python="3.99")
    assert resp["state"] == "failed" and resp["exit_status"] is None
    assert "3.99" in resp["message"] and "available" in resp["message"]
    assert "3.11" in resp["message"]


def test_requested_python_version(client: httpx.Client) -> None:
    pythons = client.get("/api/host").json()["pythons"]
    other = next((v for v in reversed(pythons) if v != f"{sys.version_info[0]}.{sys.version_info[1]}"), None)
    if other is None:
        pytest.skip("only one Python version on this host")
    resp, records = run(client, ["python -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'"], python=other)
    assert resp["state"] == "done", text(records, None)
    assert text(records) == f"{other}\n"


def make_wheel(dir: Path) -> Path:
    path = dir / "dstacktinypkg-0.1-py3-none-any.whl"
    files = {
        "dstacktinypkg/__init__.py": "VALUE = 42\n",
        "dstacktinypkg-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: dstacktinypkg\nVersion: 0.1\n",
        "dstacktinypkg-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "dstacktinypkg-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("dstacktinypkg-0.1.dist-info/RECORD", record)
    return path


def test_pip_install_goes_to_job_venv(client: httpx.Client, tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    code = make_tar({wheel.name: wheel.read_bytes()})
    commands = [
        f"pip install -q --no-index --no-deps ./{wheel.name}",
        "python -c 'import sys, dstacktinypkg; print(sys.prefix); print(dstacktinypkg.__file__)'",
    ]
    resp, records = run(client, commands, code=code, timeout=60)
    assert resp["state"] == "done", text(records, None)
    prefix, module = text(records).splitlines()[-2:]
    assert prefix.endswith("/venv") and "/jobs/" in prefix
    assert module.startswith(prefix + "/lib/")
    probe = subprocess.run([sys.executable, "-c", "import dstacktinypkg"], capture_output=True)
    assert probe.returncode != 0  # the agent's / test's own environment is untouched


def test_image_fails_clearly(client: httpx.Client) -> None:
    resp, _ = run(client, ["echo never"], image="registry.invalid/ubuntu:22.04")
    assert resp["state"] == "failed"
    if client.get("/api/host").json()[
        "containers"
    ]:  # a container CLI works: the pull fails (tests/agent/test_containers.py)
        assert resp["message"].startswith("cannot pull image 'registry.invalid/ubuntu:22.04'"), resp["message"]
    else:
        assert resp["message"].startswith("containers are not available on this host")


def test_started_at_is_when_the_process_starts(client: httpx.Client) -> None:
    """`started_at` falls between `/start` and the job's first line of user code.

    (The latency itself is measured by bench/agent/bench_start_latency.py.)"""
    run(client, ["true"])  # venv and pip bundle for the default python are cached now
    for _ in range(2):
        job_id = submit(client, ["python -c 'import time; print(time.time())'"], start=False)
        t0 = time.time()
        assert client.post(f"/api/jobs/{job_id}/start").status_code == 200
        resp, records = wait_final(client, job_id)
        assert resp["state"] == "done", resp
        user_code = float(text(records))
        assert t0 <= resp["started_at"] <= user_code <= resp["finished_at"], (t0, resp, user_code)


def test_api_errors_and_auth(client: httpx.Client, agent: AgentInfo) -> None:
    assert httpx.get(f"{agent.url}/api/healthcheck").json()["service"] == "dstack-agent"
    assert httpx.get(f"{agent.url}/api/jobs").status_code == 401
    assert httpx.get(f"{agent.url}/api/jobs", headers={"Authorization": "Bearer nope"}).status_code in (401, 403)
    job_id = submit(client, ["true"], start=False)
    assert client.post("/api/jobs", json={"job_id": job_id, "commands": []}).status_code == 409
    assert client.post("/api/jobs", json={"job_id": "../x", "commands": []}).status_code == 422
    assert client.get("/api/jobs/nope/pull").status_code == 404
    assert {"job_id": job_id, "state": "submitted", "network": "host", "address": "127.0.0.1"} in client.get(
        "/api/jobs"
    ).json()
    assert client.delete(f"/api/jobs/{job_id}").status_code == 200
    assert all(j["job_id"] != job_id for j in client.get("/api/jobs").json())
    host = client.get("/api/host").json()
    assert host["cpus"] >= 1 and host["memory_mib"] > 0 and host["disk_mib"] > 0
    assert isinstance(host["gpus"], list) and host["pythons"]


def test_delete_running_job(client: httpx.Client, home: Path) -> None:
    job_id = submit(client, ["echo x", "sleep 30"])
    while not pull(client, job_id, wait=5)["logs"]:
        pass
    assert client.delete(f"/api/jobs/{job_id}").status_code == 200
    assert client.get(f"/api/jobs/{job_id}/pull").status_code == 404
    assert not (home / "jobs" / job_id).exists()


def test_restart_remembers_jobs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    info = start_agent(home, TOKEN)
    try:
        with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            done_id = submit(c, ["echo kept"])
            wait_final(c, done_id)
            run_id = submit(c, ["echo started", "sleep 60"])
            while not pull(c, run_id, wait=5)["logs"]:
                pass
            job_pid = json.loads((home / "jobs" / run_id / "state.json").read_text())["pid"]
        os.kill(info.pid, signal.SIGKILL)
        wait_gone(info.pid)
        assert psutil.pid_exists(job_pid)  # the job outlived its agent (own session)
        info = start_agent(home, TOKEN)
        with httpx.Client(base_url=info.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
            states = {j["job_id"]: j["state"] for j in c.get("/api/jobs").json()}
            assert states == {done_id: "done", run_id: "failed"}
            assert pull(c, run_id)["message"] == "agent restarted"
            assert text(pull(c, done_id)["logs"]) == "kept\n"
        wait_until(lambda: not alive(job_pid), timeout=5, what="the orphaned job process to be killed")
    finally:
        _stop_agent(info)


def test_agent_outlives_its_spawner(tmp_path: Path) -> None:
    home = tmp_path / "home"
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from dstack.agent.launcher import start_agent\n"
        f"info = start_agent(Path({str(home)!r}), 'tok')\n"
        "print(json.dumps(info.__dict__))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    info = AgentInfo(**json.loads(out.stdout))
    try:
        assert info.url == f"http://127.0.0.1:{info.port}"
        assert is_agent_alive(info)
        assert json.loads((home / "agent.json").read_text())["pid"] == info.pid
    finally:
        _stop_agent(info)
    assert not is_agent_alive(info)


def test_parse_nvidia_smi() -> None:
    out = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA A10G, 23028\n"
    assert parse_nvidia_smi(out) == [
        {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "vendor": "nvidia"},
        {"index": 1, "name": "NVIDIA A10G", "memory_mib": 23028, "vendor": "nvidia"},
    ]


def test_pull_linger_batches_lines_but_not_state_changes(client: httpx.Client) -> None:
    """A job printing a line every 20 ms: with linger the answers carry several lines each; the
    final state still comes back at once, with every record."""
    job_id = submit(client, ["for i in $(seq 1 15); do echo line-$i; sleep 0.02; done"], code=make_tar({}))
    cursor, answers, lines, state = 0, 0, [], None
    deadline = time.monotonic() + 30
    while state not in ("done", "failed") and time.monotonic() < deadline:
        resp = pull(client, job_id, cursor, wait=5, linger=0.5)
        answers += 1
        lines += [base64.b64decode(r["data"]).decode() for r in resp["logs"]]
        cursor, state = resp["next_cursor"], resp["state"]
    assert state == "done"
    assert "".join(lines).split() == [f"line-{i}" for i in range(1, 16)]
    assert answers < 8  # without linger a pull answers per line or two
