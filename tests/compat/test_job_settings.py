"""Run settings that reach the job: `stop_duration` is the grace between SIGTERM and SIGKILL."""

import pytest

from dstack.core.errors import ConfigurationError
from dstack.core.models.configurations import parse_run_configuration
from dstack.server.services.jobs import build_job_spec


def _task(**fields):
    return parse_run_configuration({"type": "task", "commands": ["true"], **fields})


def test_stop_duration_is_the_jobs_stop_grace():
    assert build_job_spec("r", _task(), 0, 0).stop_grace_seconds == 10
    assert build_job_spec("r", _task(stop_duration="2m"), 0, 0).stop_grace_seconds == 120
    assert build_job_spec("r", _task(stop_duration=3), 0, 0).stop_grace_seconds == 3
    for bad, words in (("off", "not supported yet"), ("2d", "cannot exceed")):
        with pytest.raises(ConfigurationError) as e:
            _task(stop_duration=bad)
        assert e.value.field == "stop_duration" and words in str(e.value)
