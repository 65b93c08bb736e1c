"""`client.metrics`: a job's CPU, memory and GPU usage as its agent sampled it (dstack's shape)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

if TYPE_CHECKING:
    from dstack.api.client import Client


@dataclass(frozen=True)
class Metric:
    """One series, newest first: `values[i]` was measured at `timestamps[i]`."""

    name: str
    timestamps: list[datetime]
    values: list[Any]


@dataclass(frozen=True)
class JobMetrics:
    metrics: list[Metric] = field(default_factory=list)

    def get(self, name: str) -> Metric | None:
        return next((m for m in self.metrics if m.name == name), None)

    def latest(self, name: str) -> Any:
        """The newest value of `name`, or None when there is none."""
        metric = self.get(name)
        return metric.values[0] if metric and metric.values else None

    @staticmethod
    def from_dict(d: dict[str, Any]) -> JobMetrics:
        return JobMetrics(
            [
                Metric(m["name"], [datetime.fromisoformat(t) for t in m["timestamps"]], list(m["values"]))
                for m in d.get("metrics", [])
            ]
        )


class MetricsCollection:
    def __init__(self, client: Client) -> None:
        self._client = client

    def get_job_metrics(
        self,
        run_name: str,
        replica_num: int = 0,
        job_num: int = 0,
        limit: int = 1,
        after: datetime | None = None,
        before: datetime | None = None,
    ) -> JobMetrics:
        """The newest `limit` samples of the run's job (replica_num, job_num)."""
        params: dict[str, Any] = {"replica_num": replica_num, "job_num": job_num, "limit": limit}
        if after is not None:
            params["after"] = after.isoformat()
        if before is not None:
            params["before"] = before.isoformat()
        path = f"/api/project/{self._client.project}/metrics/job/{quote(run_name, safe='')}?{urlencode(params)}"
        return JobMetrics.from_dict(self._client.api.get(path))
