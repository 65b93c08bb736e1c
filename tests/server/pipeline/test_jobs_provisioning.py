"""What a `provisioning` job's agent is sent: the agent's own wire model, built from the rows."""

import json

import pytest
from pydantic import ValidationError

from dstack.agent.models import AgentJobSubmission
from dstack.core.models.runs import JobSpec, RunSpec
from dstack.server.background.pipeline.jobs_provisioning import build_submission, venv_key
from dstack.server.services.runs import parse_configuration
from tests.server.pipeline.factories import add_job, make_instance, make_run


def _build(configuration, spec=None, **job_fields):
    run = make_run(configuration)
    job = add_job(run, spec=spec, reserved=json.dumps({"cpus": 1, "memory_mib": 512, "gpus": []}), **job_fields)
    run_spec = RunSpec.model_validate_json(run.run_spec)
    return run, job, build_submission(run, job, run_spec, parse_configuration(run_spec), make_instance())


def test_a_task_is_sent_as_the_agents_model():
    run, job, sent = _build({"commands": ["echo hi"]}, spec={"commands": ["echo hi"], "env": {"A": "1"}})
    assert isinstance(sent, AgentJobSubmission)
    assert sent.job_id == job.id and sent.run_name == run.run_name and sent.project_id == run.project_id
    assert sent.commands == ["echo hi"] and sent.network == "host"
    assert sent.env["A"] == "1" and sent.env["DSTACK_RUN_NAME"] == run.run_name
    assert not sent.prewarm and not sent.worker_site and sent.venv_key is None


def test_service_replicas_get_their_own_network_and_setups_share_a_venv():
    conf = {"type": "service", "commands": ["serve"], "port": 8000}
    run, job, sent = _build(conf, spec={"setup": ["pip install x"]})
    assert sent.network == "isolated"
    assert sent.venv_key is not None and sent.venv_key == venv_key(
        run.project_id, JobSpec.model_validate_json(job.job_spec)
    )
    assert venv_key("another-project", JobSpec.model_validate_json(job.job_spec)) != sent.venv_key


def test_serverless_workers_start_warm_unless_told_not_to():
    _, _, sent = _build({"type": "serverless", "commands": ["python handler.py"]})
    assert sent.prewarm and sent.worker_site
    _, _, cold = _build({"type": "serverless", "commands": ["python h.py"]}, spec={"env": {"DSTACK_PREWARM": "0"}})
    assert not cold.prewarm and cold.worker_site


def test_a_field_the_agent_would_refuse_fails_here():
    with pytest.raises(ValidationError, match="stop_grace_seconds"):
        _build({}, spec={"stop_grace_seconds": -1})
