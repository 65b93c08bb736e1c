"""Shared fixtures: a real `dstack server` process on a free port in a temporary home."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.pg import fresh_database
from tests.util import free_port, wait_until

# A suite started in the background by a shell without job control inherits SIGINT ignored, and
# every process it starts would too: tests that press Ctrl-C on a CLI (detach, stop) could then
# never pass. Handling it here gives children the default disposition again (exec resets it).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SRC = str(Path(__file__).resolve().parents[1] / "src")


@dataclass
class ServerProcess:
    """A dstack server subprocess; `restart()` keeps its home (and database)."""

    home: Path
    port: int
    token: str
    database_url: str | None = None
    extra_env: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["DSTACK_HOME"] = str(self.home)
        env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
        env["DSTACK_SERVER_ADMIN_TOKEN"] = self.token
        if self.database_url:
            env["DSTACK_DATABASE_URL"] = self.database_url
        return env

    def start(self) -> None:
        log = open(self.home / f"server-{int(time.time() * 1000)}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dstack.cli.main", "server", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(self._answers, timeout=120, interval=0.1, what="the server to answer")
        except AssertionError:
            raise RuntimeError(f"server did not start: {self.logs()}") from None

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited: {self.logs()}")
        try:
            return httpx.post(f"{self.url}/api/users/get_my_user", headers=self.headers, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def logs(self, tail: int = 4000) -> str:
        """The last `tail` characters of each start's log."""
        return "\n".join(p.read_text(errors="replace")[-tail:] for p in sorted(self.home.glob("server-*.log")))

    def agent_logs(self, tail: int = 4000) -> str:
        """The last `tail` characters of the log of each agent this server started locally."""
        return "\n".join(
            f"== {p.relative_to(self.home)}\n" + p.read_text(errors="replace")[-tail:]
            for p in sorted(self.home.rglob("agent.log"))
        )

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, project: str = "main"):
        from dstack.api import Client

        return Client.from_config(project_name=project, server_url=self.url, user_token=self.token)

    def kill_agents(self) -> None:
        for info in self.home.rglob("agent.json"):
            try:
                pid = json.loads(info.read_text())["pid"]
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except (OSError, ValueError, KeyError):
                pass
        # warm-start zygotes of this home's venvs (they idle out after 30 min otherwise)
        subprocess.run(["pkill", "-f", f"{self.home}/.*prewarm/zygote.py"], check=False)


def _database_url(tmp: Path, database: str = "sqlite") -> str | None:
    pg = os.environ.get("DSTACK_TEST_POSTGRES")
    if database == "sqlite":
        return None
    if not pg:
        pytest.skip("PostgreSQL tests need DSTACK_TEST_POSTGRES (a server URL); .ci/run starts one")
    return fresh_database(pg)


def make_server(tmp_path: Path, database: str = "sqlite", **extra_env) -> ServerProcess:
    home = tmp_path / "dstack-home"
    home.mkdir(parents=True, exist_ok=True)
    return ServerProcess(
        home=home,
        port=free_port(),
        token="test-admin-token-" + os.urandom(6).hex(),
        database_url=_database_url(tmp_path, database),
        extra_env=dict(extra_env),
    )


#: short retry backoff and autoscaler window, so tests of those finish in seconds
TEST_SERVER_ENV = {"DSTACK_SERVER_RETRY_DELAYS": "1,2,4", "DSTACK_SERVER_AUTOSCALER_WINDOW": "4"}


@contextlib.contextmanager
def running_server(tmp_path: Path, database: str = "sqlite", **extra_env):
    """A started server that is stopped, and its agents killed, however the test ends."""
    srv = make_server(tmp_path, database, **{**TEST_SERVER_ENV, **extra_env})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        srv.kill_agents()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request, tmp_path_factory):
    """One server per test module and database (starting one costs seconds).

    Every test that uses it runs on SQLite and, when DSTACK_TEST_POSTGRES is set, on PostgreSQL.
    """
    with running_server(tmp_path_factory.mktemp("server"), request.param) as srv:
        yield srv


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_server(request, tmp_path):
    """A server of the test's own, for tests that kill or restart it."""
    with running_server(tmp_path, request.param) as srv:
        yield srv


@pytest.fixture
def client(server):
    return server.client()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that used a server shows the end of that server's log (CI keeps no files)."""
    report = yield
    if report.when == "call" and report.failed:
        for name in ("server", "fresh_server"):
            srv = item.funcargs.get(name) if hasattr(item, "funcargs") else None
            if isinstance(srv, ServerProcess):
                report.sections.append((f"{name} log (last 12 kB of each start)", srv.logs(tail=12000)))
                report.sections.append((f"{name}'s local agents' logs (last 4 kB each)", srv.agent_logs()))
    return report


# Fixtures that start processes (a server, an agent, a model): a test using any of them is in the
# slow tier, so `pytest -m "not slow"` is the fast tier (configuration, conversions, bookkeeping).
_SLOW_FIXTURES = {
    "server",
    "fresh_server",
    "client",
    "small_server",
    "agent",
    "agent_client",
    "bridge",
    "endpoint",
    "sdk_endpoint",
    "pg_url",
    "database_url",
}
_SLOW_DIRS = ("tests/e2e/", "tests/security/")
# Modules whose tests start their own processes (servers killed and restarted, agents, workers).
_SLOW_MODULES = (
    "tests/serverless/test_durability.py",
    "tests/serverless/test_no_duplicates.py",
    "tests/serverless/test_uncounted_workers.py",
    "tests/server/test_pipeline_isolation.py",
    "tests/agent/",
    "tests/proxy/test_forwarding.py",
    "tests/proxy/test_gateway.py",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.path).replace(os.sep, "/")
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or any(
            d in path for d in _SLOW_DIRS + _SLOW_MODULES
        ):
            item.add_marker(pytest.mark.slow)
