"""The worker-count decision, kept pure so it can be tested without processes."""

from __future__ import annotations

from dataclasses import dataclass

from dstack.serverless.settings import EndpointSettings


@dataclass
class QueueSnapshot:
    queued: int  # normal-priority jobs waiting (low priority never triggers scaling)
    in_progress: int  # normal-priority jobs running
    oldest_wait: float  # seconds the oldest normal job has waited; 0 when none
    live: int  # workers initializing or ready
    initializing: int


def desired_workers(s: EndpointSettings, q: QueueSnapshot) -> int:
    """How many live workers the endpoint should have now. Scale-down happens only through the
    idle timeout, so this is a floor for starting workers, never a reason to stop a busy one."""
    want = s.workers_min
    if s.scaler_type == "request_count":
        want = max(want, s.desired_by_request_count(q.queued + q.in_progress))
    elif q.queued > 0 and q.live > 0 and q.initializing == 0 and q.oldest_wait > s.scaler_value:
        want = max(want, q.live + 1)
    if q.queued > 0:
        want = max(want, 1)  # the first job at zero workers starts one at once
    return min(want, s.workers_max)
