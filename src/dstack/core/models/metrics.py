"""One job usage sample, as the agent takes it and the server stores it.

The agent builds these (agent.metrics) and serves them on `GET /api/jobs/{id}/metrics`; the
server's collector (server.services.job_metrics) validates what comes back with the same model
before storing it, so the wire format and its bounds are written once.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_GPUS_PER_SAMPLE = 64


class GpuSample(BaseModel):
    """One GPU's reading (`nvidia-smi` reports per device, not per process)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True)

    index: int = Field(ge=0, lt=1024)
    util_percent: float = Field(ge=0, le=100)
    memory_used_bytes: int = Field(ge=0, lt=2**62)
    memory_total_bytes: int = Field(ge=0, lt=2**62)


class JobMetricsSample(BaseModel):
    """A job's process tree at one moment: CPU (percent of one core, and seconds so far), RSS, GPUs."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True)

    ts: float = Field(gt=0)  # seconds since the epoch
    cpu_percent: float = Field(ge=0, lt=1e6)
    cpu_seconds: float = Field(ge=0, lt=1e12)
    memory_bytes: int = Field(ge=0, lt=2**62)
    gpus: list[GpuSample] = Field(default_factory=list, max_length=MAX_GPUS_PER_SAMPLE)

    @field_validator("gpus", mode="before")
    @classmethod
    def _no_gpus(cls, value: Any) -> Any:
        return [] if value is None else value
