"""The event-driven pipeline that moves runs and jobs through their states.

One module per state, each with a pure `process_*` function that reads rows and returns a
decision (`decisions`): jobs `jobs_submitted`, `jobs_provisioning`, `jobs_running`,
`jobs_terminating`; runs `runs_pending`, `runs_active`, `runs_terminating`. `loop.Pipeline`
loads rows, applies decisions in one transaction per run, then talks to agents
(`agent_tasks`), never inside a transaction.
"""

from dstack.server.background.pipeline.agent_tasks import AgentDirectory, AgentTasks
from dstack.server.background.pipeline.common import (
    AGENT_LOST,
    AGENT_RESTARTED_MESSAGE,
    MAX_DEADLINE_SECONDS,
    MAX_REPLICA_FAILURES,
    REPLICA_STABLE_SECONDS,
    capped_timedelta,
    retry_delays,
)
from dstack.server.background.pipeline.jobs_provisioning import venv_key
from dstack.server.background.pipeline.loop import Pipeline

__all__ = [
    "AGENT_LOST",
    "AGENT_RESTARTED_MESSAGE",
    "MAX_DEADLINE_SECONDS",
    "MAX_REPLICA_FAILURES",
    "REPLICA_STABLE_SECONDS",
    "AgentDirectory",
    "AgentTasks",
    "Pipeline",
    "capped_timedelta",
    "retry_delays",
    "venv_key",
]
