"""Per-endpoint settings and service-wide knobs, as plain dataclasses.

The server fills `EndpointSettings` from a `ServerlessConfiguration`; keeping our own type means
the queue does not depend on the configuration model's exact shape.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ScalerType = Literal["queue_delay", "request_count"]
DEFAULT_SCALER_VALUES: dict[str, float] = {"queue_delay": 4.0, "request_count": 4.0}


@dataclass
class EndpointSettings:
    workers_min: int = 0
    workers_max: int = 3
    idle_timeout: float = 5.0  # seconds without a job before a worker above the minimum is stopped
    scaler_type: ScalerType = "queue_delay"
    scaler_value: float = 4.0  # queue_delay: seconds; request_count: jobs per worker
    execution_timeout: float = 600.0  # seconds; a job's policy.executionTimeout (ms) overrides it

    def __post_init__(self) -> None:
        if self.workers_min < 0 or self.workers_max < 1 or self.workers_min > self.workers_max:
            raise ValueError(
                f"workers must satisfy 0 <= min <= max, max >= 1; got {self.workers_min}..{self.workers_max}"
            )
        if self.scaler_type not in DEFAULT_SCALER_VALUES:
            raise ValueError(f"unknown scaler type {self.scaler_type!r}")
        if not self.scaler_value or self.scaler_value <= 0:
            self.scaler_value = DEFAULT_SCALER_VALUES[self.scaler_type]

    @classmethod
    def from_configuration(cls, conf: Any) -> EndpointSettings:
        """Duck-typed read of a `ServerlessConfiguration` (workers range, idle_timeout, scaler, ...)."""
        workers = getattr(conf, "workers", None)
        scaler = getattr(conf, "scaler", None)
        stype = getattr(scaler, "type", "queue_delay") if scaler is not None else "queue_delay"
        svalue = getattr(scaler, "value", None) if scaler is not None else None
        wmin = getattr(workers, "min", None) if workers is not None else None
        wmax = getattr(workers, "max", None) if workers is not None else None
        return cls(
            workers_min=int(wmin if wmin is not None else 0),
            workers_max=int(wmax if wmax is not None else 3),
            idle_timeout=float(getattr(conf, "idle_timeout", 5) or 0),
            scaler_type=stype,
            scaler_value=float(svalue) if svalue else DEFAULT_SCALER_VALUES[stype],
            execution_timeout=float(getattr(conf, "execution_timeout", 600) or 600),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EndpointSettings:
        data = json.loads(text or "{}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def desired_by_request_count(self, active_jobs: int) -> int:
        return math.ceil(active_jobs / self.scaler_value) if active_jobs > 0 else 0


@dataclass
class ServiceOptions:
    """Timing knobs of `ServerlessService`; tests shrink them, production keeps the defaults."""

    take_wait: float = 20.0  # long-poll hold of job-take / job-stop (the SDK gives up at 90 s)
    take_recheck: float = 2.0  # safety re-read of the queue while waiting (other server replicas)
    runsync_default_ms: int = 90_000
    runsync_max_ms: int = 300_000
    default_ttl_ms: int = 24 * 3600 * 1000
    retention: float = 30 * 60.0  # seconds a finished result stays readable
    webhook_retry_delay: float = 10.0
    webhook_attempts: int = 3  # the first try and two retries
    webhook_timeout: float = 10.0
    max_attempts: int = 3  # claims of one job before a lost worker makes it FAILED
    ping_interval_ms: int = 10_000  # RUNPOD_PING_INTERVAL handed to workers
    heartbeat_timeout: float | None = None  # default: 3 ping intervals + 10 s
    init_timeout: float = 600.0  # a worker that never calls in for this long is replaced
    lost_job_grace: float | None = None  # default: max(3 s, 2 ping intervals)
    tick: float = 0.5  # background loop period
    # added to every worker's env; DEBUG (the SDK default) logs every poll
    extra_worker_env: dict[str, str] = field(default_factory=lambda: {"RUNPOD_LOG_LEVEL": "INFO"})

    @property
    def ping_interval(self) -> float:
        return max(1.0, self.ping_interval_ms / 1000)

    @property
    def heartbeat_deadline(self) -> float:
        if self.heartbeat_timeout is not None:
            return self.heartbeat_timeout
        return 3 * self.ping_interval + 10

    @property
    def lost_grace(self) -> float:
        if self.lost_job_grace is not None:
            return self.lost_job_grace
        return max(3.0, 2 * self.ping_interval)
