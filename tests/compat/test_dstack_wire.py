"""Our run/plan JSON in dstack's shapes (routers/dstack_wire.py), validated by the official models."""

import json
import subprocess

import pytest

from dstack.server.routers import dstack_wire

SUB = {
    "id": "3f1c2b9e-8d4a-4c1e-9a57-2f6b8d1e0c11",
    "submission_num": 0,
    "submitted_at": "2026-01-01T00:00:00+00:00",
    "started_at": None,
    "finished_at": None,
    "status": "running",
    "termination_reason": None,
    "termination_reason_message": None,
    "exit_status": None,
    "job_provisioning_data": {
        "backend": "local",
        "region": "local",
        "instance_id": "i-1",
        "instance_name": "local",
        "hostname": "127.0.0.1",
        "resources": {"cpus": 4, "memory_mib": 8192, "disk_mib": 100000, "gpus": []},
        "price": 0.0,
    },
}


def _run(conf: dict, reason: str | None = None) -> dict:
    return {
        "id": "0b5e8f5c-4c7d-4a36-9c1b-6a0e7f9d2a33",
        "project_name": "main",
        "user": "admin",
        "run_name": "r",
        "submitted_at": "2026-01-01T00:00:00+00:00",
        "last_processed_at": "2026-01-01T00:00:01+00:00",
        "status": "running",
        "termination_reason": reason,
        "run_spec": {"run_name": "r", "configuration": conf},
        "jobs": [
            {
                "job_spec": {"job_num": 0, "replica_num": 0, "job_name": "r-0-0", "commands": ["x"],
                             "requirements": {"cpu": {"min": 2, "max": None}, "memory": {"min": 8.0, "max": None},
                                              "gpu": None, "disk": {"min": 100.0, "max": None}}},
                "job_submissions": [SUB],
            }
        ],
        "service": None,
        "cost": 0.0,
    }  # fmt: skip


SERVERLESS = {"type": "serverless", "commands": ["python handler.py"], "workers": {"min": 0, "max": 3}}
TASK = {
    "type": "task",
    "commands": ["x"],
    "resources": {"cpu": {"min": 2, "max": None}, "disk": {"min": 1.0, "max": None}},
}


def test_shapes_for_the_official_client():
    run = dstack_wire.run(_run(TASK, reason="max_duration_exceeded"))
    jpd = run["jobs"][0]["job_submissions"][0]["job_provisioning_data"]
    assert jpd["backend"] == "remote" and jpd["instance_type"]["resources"]["cpus"] == 4
    assert run["latest_job_submission"]["last_processed_at"] == "2026-01-01T00:00:01+00:00"
    assert run["termination_reason"] == "job_failed"  # a reason dstack's enum has
    conf = run["run_spec"]["configuration"]
    assert conf["resources"]["disk"] == {"size": {"min": 1.0, "max": None}}
    assert conf["resources"]["cpu"] == {"arch": None, "count": {"min": 2, "max": None}}
    assert dstack_wire.run(_run(SERVERLESS))["run_spec"]["configuration"]["type"] == "task"


@pytest.mark.slow  # may install the official package first
def test_the_official_models_accept_them(official_venv_dir):
    runs = [dstack_wire.run(_run(TASK)), dstack_wire.run(_run(SERVERLESS))]
    code = (
        "import json, sys\n"
        "from dstack._internal.core.models.common import validate_extra_ignore\n"
        "from dstack._internal.core.models.runs import Run\n"
        "for r in json.load(sys.stdin):\n"
        "    run = validate_extra_ignore(Run, r)\n"
        "    print(run.run_spec.configuration.type, run.jobs[0].job_submissions[-1].job_provisioning_data.backend.value)\n"
    )
    out = subprocess.run(
        [str(official_venv_dir / "bin" / "python"), "-c", code], input=json.dumps(runs), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["task", "remote", "task", "remote"]
