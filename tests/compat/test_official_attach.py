"""dstack's official client (0.22.5) attaching to our runs: `dstack apply` without `-d`,
`dstack attach`, and `ssh RUN` with the SSH config it writes.

The server runs with its SSH entry on (`DSTACK_SERVER_SSH_PORT`); the client uses the user SSH key
the server hands it (`users/get_my_user`), as a user who passes no `--ssh-identity` does. Each
step is the real CLI driving OpenSSH against a real server; what it prints comes from real jobs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import textwrap
import threading

import httpx
import pytest

from tests.compat.official import OfficialClient
from tests.conftest import running_server
from tests.util import free_port, wait_until

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs OpenSSH's client (Debian: openssh-client)")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request, tmp_path_factory):
    """A server of this module's with its SSH entry listening on a free port."""
    with running_server(
        tmp_path_factory.mktemp("server"), request.param, DSTACK_SERVER_SSH_PORT=str(free_port())
    ) as srv:
        yield srv


class Output:
    """A background CLI process's output, read as it comes."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        def seen() -> bool:
            if text in self.text:
                return True
            if self.proc.poll() is not None:
                self._thread.join(5)
                if text in self.text:
                    return True
                raise AssertionError(f"exited {self.proc.returncode} before printing {text!r}:\n{self.text[-3000:]}")
            return False

        wait_until(seen, timeout=timeout, interval=0.2, what=repr(text))

    def interrupt(self, timeout: float = 30) -> int:
        """Ctrl-C, as a user detaches."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._thread.join(5)


def _run(server, name: str) -> dict:
    r = httpx.post(f"{server.url}/api/project/main/runs/get", headers=server.headers, json={"run_name": name})
    r.raise_for_status()
    return r.json()


def _wait_status(server, name: str, statuses: set[str], timeout: float = 120) -> dict:
    return wait_until(
        lambda: (run := _run(server, name))["status"] in statuses and run, timeout=timeout, interval=0.5, what=name
    )


def _forwarded(port: int, out: Output, timeout: float = 180) -> str:
    """What the job's server answers on the local end of the client's forward."""

    def answer() -> str | None:
        if out.proc.poll() is not None:
            raise AssertionError(f"the client exited {out.proc.returncode}")
        return _get(port)

    try:
        return wait_until(answer, timeout=timeout, interval=0.3, what=f"the forwarded port {port}")
    except AssertionError as e:
        raise AssertionError(f"{e}; the client printed:\n{out.text[-3000:]}") from None


@contextlib.contextmanager
def _stopped_after(server, name: str):
    """Stop the run however the test ends, and wait until it has: the next test needs the host."""
    try:
        yield
    finally:
        httpx.post(
            f"{server.url}/api/project/main/runs/stop",
            headers=server.headers,
            json={"runs_names": [name], "abort": False},
        ).raise_for_status()
        _wait_status(server, name, {"terminated", "done", "failed"}, timeout=60)


def _get(port: int) -> str | None:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)  # the job answers one request: do not give up on it
    except httpx.HTTPError:
        return None
    return r.text if r.status_code == 200 else None


def _http_once(port: int, answer: str) -> str:
    """A job command: answer one GET on `port`, then print that it did."""
    return (
        "python3 -c 'import http.server as h\n"
        "class H(h.BaseHTTPRequestHandler):\n"
        "    def do_GET(s):\n"
        f'        s.send_response(200); s.end_headers(); s.wfile.write(b"{answer}")\n'
        f'srv = h.HTTPServer(("0.0.0.0", {port}), H); srv.timeout = 150; srv.handle_request(); print("served", flush=True)\''
    )


def test_attached_apply_forwards_the_port_and_shows_the_logs_to_the_end(official: OfficialClient, server, tmp_path):
    job_port, local_port = free_port(), free_port()
    conf = tmp_path / "attached.dstack.yml"
    conf.write_text(
        textwrap.dedent(
            """
            type: task
            name: attached-task
            ports: ["LOCAL:PORT"]
            commands:
              - echo first line
              - echo second line
            """
        )
        .replace("LOCAL", str(local_port))
        .replace("PORT", str(job_port))
        + f"  - |\n{textwrap.indent(_http_once(job_port, 'hello from the job'), '    ')}\n"
        + "  - echo last line\n"
    )
    out = Output(official.start("apply", "-f", str(conf), "-y", cwd=tmp_path))
    try:
        # the job's port is reachable on the local port while the run is attached
        assert _forwarded(local_port, out) == "hello from the job"
        assert out.proc.wait(120) == 0, out.text
    finally:
        out.close()
    lines = out.lines
    # every line the job printed, in order, through the attached logs (not the logs API)
    printed = [ln for ln in lines if ln in ("first line", "second line", "served", "last line")]
    assert printed == ["first line", "second line", "served", "last line"], out.text
    assert _run(server, "attached-task")["status"] == "done"
    assert _get(local_port) is None  # the tunnel went with the run


def test_attach_to_a_running_task_and_service(official: OfficialClient, server, tmp_path):
    # one run at a time: each takes the whole (small) local host by default
    job_port, local_port = free_port(), free_port()
    task = tmp_path / "task.dstack.yml"
    task.write_text(
        f'type: task\nname: attach-task\nports: ["{local_port}:{job_port}"]\ncommands:\n'
        "  - echo task started\n"
        f"  - |\n{textwrap.indent(_http_once(job_port, 'hello again'), '    ')}\n"
        "  - sleep 600\n"
    )
    official.cli("apply", "-f", str(task), "-y", "-d", cwd=tmp_path)
    with _stopped_after(server, "attach-task"):
        _wait_status(server, "attach-task", {"running"})
        out = Output(official.start("attach", "--logs", "attach-task"))
        try:
            out.wait_for("Attached to run")
            assert _forwarded(local_port, out, 60) == "hello again"
            out.wait_for("served")  # the attached logs follow what the job prints
            assert "task started" in out.text
            assert out.interrupt() == 0
        finally:
            out.close()
        assert _get(local_port) is None  # detached: the forward is gone

    svc_port = free_port()
    service = tmp_path / "svc.dstack.yml"
    service.write_text(
        f"type: service\nname: attach-svc\nport: {svc_port}\ncommands:\n"
        "  - echo service up\n"
        f"  - python3 -m http.server {svc_port}\n"
    )
    official.cli("apply", "-f", str(service), "-y", "-d", cwd=tmp_path)
    with _stopped_after(server, "attach-svc"):
        _wait_status(server, "attach-svc", {"running"})
        out = Output(official.start("attach", "--logs", "attach-svc"))
        try:
            out.wait_for("Attached to run")
            out.wait_for("service up")
            out.interrupt()
        finally:
            out.close()


def test_ssh_into_a_dev_environment_with_the_config_it_writes(official: OfficialClient, server, tmp_path):
    conf = tmp_path / "dev.dstack.yml"
    conf.write_text("type: dev-environment\nname: attach-dev\nide: vscode\nenv:\n  - MARKER=from-the-dev-env\n")
    official.cli("apply", "-f", str(conf), "-y", "-d", cwd=tmp_path)
    with _stopped_after(server, "attach-dev"):
        _wait_status(server, "attach-dev", {"running"})
        _ssh_into(official)


def _ssh_into(official: OfficialClient) -> None:
    out = Output(official.start("attach", "attach-dev"))
    try:
        out.wait_for("Attached to run")
        ssh_config = official.home / ".ssh" / "config"
        r = subprocess.run(
            ["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes", "attach-dev", "echo $MARKER; echo $DSTACK_RUN_NAME"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**official.env()},
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.split() == ["from-the-dev-env", "attach-dev"], r.stdout + r.stderr
        out.interrupt()
    finally:
        out.close()


def test_the_entry_opens_a_job_only_with_its_keys_and_only_its_ports(official: OfficialClient, server, tmp_path):
    """The user's key opens the user's job's channel to the "container" hop; another key, an
    unknown job, and any other destination are refused."""
    official.cli("apply", "-f", str(_task(tmp_path, "entry-a")), "-y", "-d", cwd=tmp_path)
    with _stopped_after(server, "entry-a"):
        run = _wait_status(server, "entry-a", {"running"})
        job_id = run["jobs"][0]["job_submissions"][-1]["id"]
        me = httpx.post(
            f"{server.url}/api/users/get_my_user", headers={**server.headers, "X-API-VERSION": "0.22.5"}
        ).json()
        user_key = tmp_path / "user_key"
        user_key.write_text(me["ssh_private_key"])
        user_key.chmod(0o600)
        other_key = tmp_path / "other_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)

        ok = _jump(server, user_key, job_id, "localhost:10022")
        assert ok.stdout.startswith("SSH-2.0-"), ok.stderr  # the inner hop's banner
        denied = _jump(server, other_key, job_id, "localhost:10022")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied.stderr
        unknown = _jump(server, user_key, "00000000-0000-4000-8000-000000000000", "localhost:10022")
        assert unknown.returncode != 0 and "Permission denied" in unknown.stderr, unknown.stderr
        for dest in ("localhost:22", f"127.0.0.1:{server.port}", "example.com:10022"):
            r = _jump(server, user_key, job_id, dest)
            assert not r.stdout and "prohibited" in r.stderr, (dest, r.stderr)
    # no login on the outer hop: it serves one channel and nothing else
    r = subprocess.run(
        [*_ssh_base(server, user_key), f"{job_id}@127.0.0.1", "id"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0, r.stdout


def _ssh_base(server, key) -> list[str]:
    port = int(server.env["DSTACK_SERVER_SSH_PORT"])
    return [
        "ssh", "-F", "none", "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-p", str(port),
    ]  # fmt: skip


def _jump(server, key, user: str, dest: str) -> subprocess.CompletedProcess:
    """`ssh -W dest` through the entry (what ProxyJump does), reading what comes back for a moment."""
    proc = subprocess.Popen(
        [*_ssh_base(server, key), "-W", dest, f"{user}@127.0.0.1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:  # a channel stays open until its peer ends it: enough seen
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _task(tmp_path, name: str):
    path = tmp_path / f"{name}.dstack.yml"
    path.write_text(f"type: task\nname: {name}\ncommands:\n  - sleep 600\n")
    return path
