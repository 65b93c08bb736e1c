"""A run the pipeline cannot process fails on its own and never stalls other projects' runs.

The poisoned rows are written straight into the server's database, past every check at the
edge, as a row from an older server or a bug would be: the pipeline must cope regardless.
"""

import json
import sqlite3
import uuid
from contextlib import closing

import httpx

from dstack.api import Resources, RunStatus, Task
from tests.conftest import running_server
from tests.util import wait_until

SMALL = Resources(cpu=1, memory="0.5GB")


def _db(srv) -> sqlite3.Connection:
    conn = sqlite3.connect(srv.home / "server" / "data" / "sqlite.db", timeout=30)
    conn.row_factory = sqlite3.Row
    return conn


def _clone_run(conn: sqlite3.Connection, template_id: str, name: str, run_spec: str, commands: list[str]) -> str:
    """Insert a copy of a finished run and its job as a fresh `submitted` run named `name`."""
    run = dict(conn.execute("SELECT * FROM runs WHERE id = ?", (template_id,)).fetchone())
    job = dict(conn.execute("SELECT * FROM jobs WHERE run_id = ?", (template_id,)).fetchone())
    run.update(
        id=str(uuid.uuid4()),
        run_name=name,
        status="submitted",
        termination_reason=None,
        error=None,
        run_spec=run_spec,
        version=1,
        resubmission_attempt=0,
        next_attempt_at=None,
    )
    spec = json.loads(job["job_spec"])
    spec["commands"] = commands
    job.update(
        id=str(uuid.uuid4()),
        run_id=run["id"],
        job_name=f"{name}-0-0",
        status="submitted",
        termination_reason=None,
        termination_reason_message=None,
        exit_status=None,
        started_at=None,
        finished_at=None,
        instance_id=None,
        reserved=None,
        job_provisioning_data=None,
        agent_state=None,
        log_cursor=0,
        stop_requested=None,
        version=1,
        job_spec=json.dumps(spec),
    )
    for table, row in (("runs", run), ("jobs", job)):
        cols = ", ".join(row)
        conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    conn.commit()
    return run["id"]


def _wait_row(srv, run_id: str, statuses: set[str], timeout: float = 90) -> sqlite3.Row:
    """The run's row once its status is one of `statuses`, or as it is after `timeout` (callers assert)."""
    last: list[sqlite3.Row] = []

    def reached() -> bool:
        with closing(_db(srv)) as conn:
            row = conn.execute("SELECT status, termination_reason, error FROM runs WHERE id = ?", (run_id,)).fetchone()
        last[:] = [row]
        return row["status"] in statuses

    try:
        wait_until(reached, timeout, 0.3, f"run {run_id} to reach {statuses}")
    except AssertionError:
        pass
    return last[0]


def test_poisoned_runs_fail_alone_and_other_projects_go_on(tmp_path):
    with running_server(tmp_path) as srv:
        r = httpx.post(f"{srv.url}/api/projects/create", json={"project_name": "other"}, headers=srv.headers)
        assert r.status_code == 200, r.text
        template = srv.client().runs.submit(Task(commands=["echo template"], resources=SMALL), run_name="template")
        template.wait(timeout=90)
        assert template.status == RunStatus.DONE
        with closing(_db(srv)) as conn:
            template_id = conn.execute("SELECT id FROM runs WHERE run_name = 'template'").fetchone()["id"]
            spec = json.loads(conn.execute("SELECT run_spec FROM runs WHERE id = ?", (template_id,)).fetchone()[0])
            # A spec that is not even JSON: every step that reads it raises.
            broken = _clone_run(conn, template_id, "broken-spec", '{"configuration": {"type": "task", ', ["true"])
            # A failing job whose retry window overflows date arithmetic (10**30 seconds).
            spec["configuration"]["retry"] = {"on_events": ["error"], "duration": 10**30}
            spec["run_name"] = "huge-retry"
            huge = _clone_run(conn, template_id, "huge-retry", json.dumps(spec), ["exit 3"])

        # Another project's plain task runs to the end while those rows sit in the pipeline.
        run = srv.client("other").runs.submit(Task(commands=["echo fine"], resources=SMALL), run_name="fine")
        run.wait(timeout=90)
        assert run.status == RunStatus.DONE, run.error
        assert b"".join(run.logs()).decode().strip() == "fine"

        row = _wait_row(srv, broken, {"failed"})
        assert row["status"] == "failed", dict(row)
        assert row["termination_reason"] == "server_error"
        assert "JSON" in row["error"] or "json" in row["error"], row["error"]
        # The huge retry window is either refused as a bad spec (failed, server_error) or capped
        # (the run retries its failing job): it never takes the pass down with it.
        row = _wait_row(srv, huge, {"failed", "pending"})
        assert row["status"] in ("failed", "pending"), dict(row)
        if row["status"] == "failed":
            assert row["termination_reason"] == "server_error" and row["error"]

        # A second plain task after many passes over the poisoned rows: still prompt.
        again = srv.client("other").runs.submit(Task(commands=["echo again"], resources=SMALL), run_name="again")
        again.wait(timeout=90)
        assert again.status == RunStatus.DONE
        logs = srv.logs(tail=10**7)
        assert "pipeline step failed" not in logs
        # Each poisoned run is logged once, with its traceback, not once per pass.
        assert logs.count(f"processing run {broken} failed") == 1
        assert "Traceback" in logs
