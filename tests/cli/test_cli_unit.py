"""CLI flows against an in-process fake of `dstack.api`: rendering, prompts, exit codes.

The end-to-end tests in test_cli_e2e.py cover the same commands against a real server; these
pin down the CLI's own behaviour without one.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dstack.cli import common
from dstack.cli.main import main
from dstack.core.models.runs import (
    InstanceOffer,
    InstanceResources,
    Job,
    JobPlan,
    JobProvisioningData,
    JobSpec,
    JobStatus,
    JobSubmission,
    JobTerminationReason,
    RunPlan,
    RunSpec,
    RunStatus,
)

RES = InstanceResources(cpus=8, memory_mib=32768, disk_mib=102400)


def _job(
    status: JobStatus, replica: int = 0, job_num: int = 0, reason: Any = None, exit_status: int | None = None
) -> Job:
    jpd = JobProvisioningData(
        backend="local",
        region="local",
        instance_id="i",
        instance_name="my-host",
        hostname="127.0.0.1",
        resources=RES,
        price=0.0,
    )
    return Job(
        job_spec=JobSpec(job_name="j", job_num=job_num, replica_num=replica),
        job_submissions=[
            JobSubmission(
                id="s",
                submission_num=0,
                submitted_at=datetime.now(UTC) - timedelta(minutes=3),
                status=status,
                termination_reason=reason,
                exit_status=exit_status,
                job_provisioning_data=jpd,
            )
        ],
    )


class FakeRun:
    def __init__(
        self,
        name: str,
        statuses: list[RunStatus],
        logs: list[bytes] = (),
        jobs: list[Job] | None = None,
        service_url: str | None = None,
        error: str | None = None,
        interrupt_logs: bool = False,
    ) -> None:
        self.name = name
        self._statuses = list(statuses)
        self.status = self._statuses.pop(0)
        self._logs = list(logs)
        self.jobs = jobs if jobs is not None else [_job(JobStatus.RUNNING)]
        self.service_url = service_url
        self.error = error
        self.termination_reason = None
        self.submitted_at = datetime.now(UTC) - timedelta(minutes=3)
        self.stopped: bool | None = None
        self.interrupt_logs = interrupt_logs
        self.log_calls: list[dict] = []

    def refresh(self) -> None:
        if self._statuses:
            self.status = self._statuses.pop(0)

    def logs(self, replica_num: int = 0, job_num: int = 0, follow: bool = True) -> Iterator[bytes]:
        self.log_calls.append({"replica_num": replica_num, "job_num": job_num, "follow": follow})
        yield from self._logs
        if self.interrupt_logs:
            raise KeyboardInterrupt
        while self._statuses:
            self.refresh()

    def stop(self, abort: bool = False) -> None:
        self.stopped = abort
        self._statuses = [RunStatus.TERMINATING, RunStatus.TERMINATED]

    def attach(self) -> None:
        pass

    def detach(self) -> None:
        pass


class FakeRuns:
    def __init__(self) -> None:
        self.run: FakeRun | None = None
        self.plan_args: dict = {}
        self.offers = [
            InstanceOffer(backend="local", region="local", instance_name=f"host-{i}", resources=RES, price=0.1 * i)
            for i in range(5)
        ]
        self.no_offers_reason: str | None = None
        self.listed: list[Any] = []
        self.applied = False

    def get_run_plan(
        self,
        configuration: Any,
        repo_dir: str = ".",
        configuration_path: str | None = None,
        run_name: str | None = None,
    ) -> RunPlan:
        self.plan_args = dict(
            configuration=configuration, repo_dir=repo_dir, configuration_path=configuration_path, run_name=run_name
        )
        offers = [] if self.no_offers_reason else self.offers
        return RunPlan(
            project_name="main",
            user="admin",
            run_spec=RunSpec(run_name=run_name or "lucky-fox-1", configuration=configuration.model_dump(mode="json")),
            job_plans=[
                JobPlan(
                    job_spec=JobSpec(job_name="j"),
                    offers=offers,
                    total_offers=len(offers),
                    no_offers_reason=self.no_offers_reason,
                )
            ],
        )

    def apply_plan(self, plan: Any) -> FakeRun:
        self.applied = True
        assert self.run is not None
        return self.run

    def list(self, all: bool = False, limit: int | None = None) -> list[Any]:
        return self.listed

    def wire(self) -> list[dict]:
        """`listed` as the server's runs/list JSON, which `dstack ps` reads directly."""
        return [
            {
                "run_name": r.name,
                "status": r.status.value,
                "submitted_at": r.submitted_at.isoformat(),
                "error": r.error,
                "termination_reason": None,
                "extra": {},
                "service": {"url": r.service_url} if r.service_url else None,
                "jobs": [j.model_dump(mode="json") for j in r.jobs],
            }
            for r in self.listed
        ]

    def get(self, name: str) -> FakeRun | None:
        if self.run is not None and self.run.name == name:
            return self.run
        return None


class FakeAPI:
    """Answers `runs/list` like the server, from the fake runs."""

    def __init__(self, runs: FakeRuns) -> None:
        self.runs = runs

    def post(self, path: str, body: dict) -> list[dict]:
        assert path == "/api/project/main/runs/list"
        return self.runs.wire()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SimpleNamespace:
    runs = FakeRuns()
    client = SimpleNamespace(
        project="main", runs=runs, api=FakeAPI(runs), repos=SimpleNamespace(init=lambda repo_dir=".": None)
    )
    monkeypatch.setattr(common, "get_client", lambda project: client)
    monkeypatch.setattr(common, "_consoles", {})
    monkeypatch.setattr("dstack.cli.attach.POLL_SECONDS", 0)
    monkeypatch.setenv("DSTACK_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    return client


def _cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    return int(info.value.code or 0)


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    path = tmp_path / "repo" / ".dstack.yml"
    path.parent.mkdir()
    path.write_text(
        textwrap.dedent("""\
        type: task
        name: hello
        commands:
          - echo hello
        resources:
          cpu: 2..
    """)
    )
    return path


def test_run_to_done_prints_plan_logs_and_exits_0(
    fake: SimpleNamespace, task_file: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    fake.runs.run = FakeRun(
        "hello",
        [RunStatus.SUBMITTED, RunStatus.PROVISIONING, RunStatus.RUNNING, RunStatus.DONE],
        logs=[b"hello\n", b"world\n"],
    )
    code = _cli("run", str(task_file.parent), "-f", str(task_file), "-y", "-e", "A=1", "--gpu", "A100:2")
    out = capfd.readouterr().out
    assert code == 0, out
    for word in (
        "Configuration",
        "Project",
        "User",
        "Type",
        "Resources",
        "Max price",
        "Max duration",
        "Spot policy",
        "Retry",
    ):
        assert word in out
    for col in ("#", "BACKEND", "REGION", "INSTANCE", "RESOURCES", "SPOT", "PRICE"):
        assert col in out
    assert "host-0" in out and "host-2" in out and "host-3" not in out
    assert "... and 2 more" in out
    assert "Launching hello" in out
    assert "hello\nworld\n" in out
    assert "Run hello is done" in out
    conf = fake.runs.plan_args["configuration"]
    assert conf.env["A"] == "1"
    assert conf.resources.gpu.name == ["A100"] and conf.resources.gpu.count.min == 2
    assert "A100:2" in out


def test_failed_run_exits_1_with_exit_status(
    fake: SimpleNamespace, task_file: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    failed_job = _job(JobStatus.FAILED, reason=JobTerminationReason.CONTAINER_EXITED_WITH_ERROR, exit_status=3)
    fake.runs.run = FakeRun("hello", [RunStatus.RUNNING, RunStatus.FAILED], logs=[b"oops\n"], jobs=[failed_job])
    code = _cli("apply", "-f", str(task_file), "-y")
    out = capfd.readouterr().out
    assert code == 1
    assert "Run hello failed: exit status 3" in out


def test_detach_returns_at_once(fake: SimpleNamespace, task_file: Path, capfd: pytest.CaptureFixture[str]) -> None:
    fake.runs.run = FakeRun("hello", [RunStatus.SUBMITTED], logs=[b"never\n"])
    code = _cli("run", str(task_file.parent), "-y", "-d", "--max-offers", "1")
    out = capfd.readouterr().out
    assert code == 0 and "never" not in out and "dstack logs -f hello" in out
    assert "... and 4 more" in out


def test_no_offers_prints_reason(fake: SimpleNamespace, task_file: Path, capfd: pytest.CaptureFixture[str]) -> None:
    fake.runs.no_offers_reason = "asked for gpu A100:2; the local host has no GPU"
    fake.runs.run = FakeRun("hello", [RunStatus.SUBMITTED])
    code = _cli("run", str(task_file.parent), "-y")
    cap = capfd.readouterr()
    assert code == 1
    assert "the local host has no GPU" in cap.err
    assert not fake.runs.applied


def test_confirmation_needs_a_terminal(
    fake: SimpleNamespace, task_file: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    fake.runs.run = FakeRun("hello", [RunStatus.SUBMITTED])
    code = _cli("run", str(task_file.parent))
    assert code == 1
    assert "-y" in capfd.readouterr().err
    assert not fake.runs.applied


def test_bad_flag_value_is_usage_error(
    fake: SimpleNamespace, task_file: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    code = _cli("run", str(task_file.parent), "-y", "--memory", "lots")
    assert code == 2
    assert "--memory" in capfd.readouterr().err


def test_malformed_yaml_names_the_line(
    fake: SimpleNamespace, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.dstack.yml"
    path.write_text("type: task\ncommands:\n  - echo hi\nenv:\n  A: 1\n   B: 2\n")
    code = _cli("apply", "-f", str(path), "-y")
    err = capfd.readouterr().err
    assert code == 1
    assert err.startswith("Error: ")
    assert "bad.dstack.yml:6" in err


def test_invalid_field_names_line_and_field(
    fake: SimpleNamespace, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.dstack.yml"
    path.write_text("type: task\ncommands:\n  - echo hi\nresources:\n  memory: lots\n")
    code = _cli("apply", "-f", str(path), "-y")
    err = capfd.readouterr().err
    assert code == 1
    assert "memory" in err and ":5" in err


def test_ctrl_c_then_yes_stops_the_run(
    fake: SimpleNamespace, task_file: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = FakeRun("hello", [RunStatus.RUNNING, RunStatus.RUNNING], logs=[b"tick\n"], interrupt_logs=True)
    fake.runs.run = run
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    code = _cli("run", str(task_file.parent), "-y")
    out = capfd.readouterr()
    assert code == 130
    assert run.stopped is False
    assert "Stop the run before detaching?" in out.out + out.err
    assert "terminated" in out.out


def test_ctrl_c_then_no_detaches(
    fake: SimpleNamespace, task_file: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = FakeRun("hello", [RunStatus.RUNNING, RunStatus.RUNNING], logs=[b"tick\n"], interrupt_logs=True)
    fake.runs.run = run
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    code = _cli("run", str(task_file.parent), "-y")
    assert code == 0
    assert run.stopped is None
    assert "Detached" in capfd.readouterr().out


def test_service_prints_url(fake: SimpleNamespace, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "serve.dstack.yml"
    path.write_text("type: service\nport: 8000\ncommands:\n  - python -m http.server 8000\n")
    fake.runs.run = FakeRun(
        "svc",
        [RunStatus.PROVISIONING, RunStatus.RUNNING, RunStatus.TERMINATED],
        service_url="http://127.0.0.1:3000/proxy/services/main/svc/",
    )
    code = _cli("apply", "-f", str(path), "-y")
    out = capfd.readouterr().out
    assert "Service is published at http://127.0.0.1:3000/proxy/services/main/svc/" in out
    assert code == 1  # it ended terminated, not done


def test_ps_table_nesting_and_errors(fake: SimpleNamespace, capfd: pytest.CaptureFixture[str]) -> None:
    failed = FakeRun(
        "bad-run",
        [RunStatus.FAILED],
        jobs=[_job(JobStatus.FAILED, reason=JobTerminationReason.CONTAINER_EXITED_WITH_ERROR, exit_status=3)],
    )
    svc = FakeRun(
        "svc",
        [RunStatus.RUNNING],
        jobs=[_job(JobStatus.RUNNING, replica=0), _job(JobStatus.RUNNING, replica=1)],
        service_url="http://x/proxy/services/main/svc/",
    )
    fake.runs.listed = [failed, svc]
    assert _cli("ps") == 0
    out = capfd.readouterr().out
    lines = out.splitlines()
    header = lines[0].split()
    assert header == ["NAME", "BACKEND", "RESOURCES", "PRICE", "STATUS", "SUBMITTED", "ERROR"]
    bad_line = next(ln for ln in lines if "bad-run" in ln)
    assert "failed" in bad_line and "exit status 3" in bad_line and "3 mins ago" in bad_line
    assert any("replica=0" in ln for ln in lines) and any("replica=1" in ln for ln in lines)
    assert "http://x/proxy/services/main/svc/" in out


def test_ps_empty_and_verbose(fake: SimpleNamespace, capfd: pytest.CaptureFixture[str]) -> None:
    assert _cli("ps") == 0
    assert "No runs" in capfd.readouterr().out
    fake.runs.listed = [
        FakeRun("ok", [RunStatus.DONE], jobs=[_job(JobStatus.DONE, reason=JobTerminationReason.DONE_BY_RUNNER)])
    ]
    assert _cli("ps", "-v") == 0
    out = capfd.readouterr().out
    assert "INSTANCE" in out and "ERROR" in out and "my-host" in out


def test_stop_and_logs(fake: SimpleNamespace, capfd: pytest.CaptureFixture[str]) -> None:
    run = FakeRun("r1", [RunStatus.RUNNING], logs=[b"line1\n"])
    fake.runs.run = run
    assert _cli("stop", "r1") == 1  # no terminal, no -y
    assert run.stopped is None
    assert _cli("stop", "r1", "-x", "-y") == 0
    assert run.stopped is True
    assert "terminated" in capfd.readouterr().out
    assert _cli("logs", "r1", "--replica", "1") == 0
    assert "line1" in capfd.readouterr().out
    assert run.log_calls[-1] == {"replica_num": 1, "job_num": 0, "follow": False}
    assert _cli("logs", "nope") == 1
    assert "not found" in capfd.readouterr().err


def test_config_command(fake: SimpleNamespace, capfd: pytest.CaptureFixture[str]) -> None:
    assert _cli("config") == 0
    assert "No projects" in capfd.readouterr().out
    assert _cli("config", "--url", "http://h:1", "--project", "p", "--token", "secret-token") == 0
    assert _cli("config", "--url", "http://h:1") == 2
    capfd.readouterr()
    assert _cli("config") == 0
    out = capfd.readouterr().out
    assert "http://h:1" in out and "secret-token" not in out


def test_init(fake: SimpleNamespace, capfd: pytest.CaptureFixture[str]) -> None:
    assert _cli("init") == 0
    assert "OK" in capfd.readouterr().out


def test_gateway_without_api(fake: SimpleNamespace, capfd: pytest.CaptureFixture[str]) -> None:
    assert _cli("gateway", "list") == 1
    assert "not implemented yet" in capfd.readouterr().err


@pytest.mark.parametrize(
    "argv,project",
    [
        (["fleet", "--project", "p1", "list"], "p1"),
        (["fleet", "list", "--project", "p2"], "p2"),
        (["secret", "--project", "p3", "list"], "p3"),
        (["volume", "--project", "p4", "delete", "v"], "p4"),
        (["volume", "list"], None),
        (["gateway", "list", "--project", "p5"], "p5"),
        (["ps", "--project", "p6"], "p6"),
    ],
)
def test_project_option_before_or_after_a_subcommand(argv: list[str], project: str | None) -> None:
    from dstack.cli.main import build_parser

    assert build_parser().parse_args(argv).project == project
