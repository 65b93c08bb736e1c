"""The one job usage sample model: what the agent serves is what the server accepts, bounds refused."""

import pytest
from pydantic import ValidationError

from dstack.core.models.metrics import MAX_GPUS_PER_SAMPLE, GpuSample, JobMetricsSample
from dstack.server.services.job_metrics import _valid_sample


def _sample(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"ts": 1700000000.5, "cpu_percent": 99.5, "cpu_seconds": 12.25, "memory_bytes": 2**30}
    base.update(over)
    return base


def test_agent_wire_form_round_trips_through_the_server_check() -> None:
    gpu = GpuSample(index=1, util_percent=40, memory_used_bytes=2**30, memory_total_bytes=2**34)
    sent = JobMetricsSample(ts=5.0, cpu_percent=1.5, cpu_seconds=2.0, memory_bytes=3, gpus=[gpu])
    received = _valid_sample(sent.model_dump(mode="json"))
    assert received == sent
    assert received is not None and received.gpus[0].index == 1


def test_missing_or_null_gpus_mean_none() -> None:
    assert JobMetricsSample.model_validate(_sample()).gpus == []
    assert JobMetricsSample.model_validate(_sample(gpus=None)).gpus == []


@pytest.mark.parametrize(
    "bad",
    [
        _sample(ts=0),
        _sample(cpu_percent=-1),
        _sample(cpu_seconds=float("nan")),
        _sample(memory_bytes=2**62),
        _sample(gpus=[{"index": 0, "util_percent": 101, "memory_used_bytes": 0, "memory_total_bytes": 0}]),
        _sample(gpus=[{"index": -1, "util_percent": 1, "memory_used_bytes": 0, "memory_total_bytes": 0}]),
        _sample(
            gpus=[
                {"index": i, "util_percent": 1, "memory_used_bytes": 0, "memory_total_bytes": 0}
                for i in range(MAX_GPUS_PER_SAMPLE + 1)
            ]
        ),
        {k: v for k, v in _sample().items() if k != "memory_bytes"},
    ],
)
def test_out_of_bounds_samples_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        JobMetricsSample.model_validate(bad)
    assert _valid_sample(bad) is None


def test_a_non_object_is_skipped() -> None:
    assert _valid_sample("not a sample") is None
    assert _valid_sample(None) is None
