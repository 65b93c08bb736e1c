"""What the pages show of a run: plain dicts built from the API's own `Run` objects.

The dashboard reads runs through `run_to_wire`, as the JSON API does, so both redact the same
secrets and agree on statuses; this module only picks and formats fields for templates.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from dstack.cli.common import format_ago, format_price
from dstack.cli.views import job_error, run_error
from dstack.core.models.resources import ResourcesSpec
from dstack.core.models.runs import Job, Run

RUN_TYPES = ("task", "service", "serverless", "dev-environment")
STATUS_FILTERS = ("active", "finished", "all")


def _requested_resources(configuration: dict[str, Any]) -> str:
    try:
        return ResourcesSpec.model_validate(configuration.get("resources") or {}).pretty_format()
    except ValueError:
        return "-"


def _latest(job: Job) -> Any:
    return job.job_submissions[-1] if job.job_submissions else None


def run_row(run: Run, now: datetime | None = None) -> dict[str, Any]:
    """One line of the runs list."""
    conf = run.run_spec.configuration
    conf = conf if isinstance(conf, dict) else {}
    instances: list[str] = []
    price = 0.0
    provisioned = False
    for job in run.jobs:
        sub = _latest(job)
        jpd = getattr(sub, "job_provisioning_data", None)
        if jpd is not None and not sub.status.is_finished():
            provisioned = True
            price += jpd.price
            if jpd.instance_name not in instances:
                instances.append(jpd.instance_name)
    return {
        "project": run.project_name,
        "name": run.run_name,
        "type": str(conf.get("type", "task")),
        "status": run.status.value,
        "finished": run.status.is_finished(),
        "resources": _requested_resources(conf),
        "instance": ", ".join(instances) or "-",
        "age": format_ago(run.submitted_at, now),
        "price": format_price(price) if provisioned else "-",
        "error": run_error(run),
        "user": run.user,
    }


def job_rows(run: Run) -> list[dict[str, Any]]:
    """Jobs (one per replica and node) with their latest submission."""
    rows = []
    for job in run.jobs:
        sub = _latest(job)
        jpd = getattr(sub, "job_provisioning_data", None)
        rows.append(
            {
                "name": job.job_spec.job_name,
                "replica": job.job_spec.replica_num,
                "job": job.job_spec.job_num,
                "submission": sub.submission_num if sub else 0,
                "status": sub.status.value if sub else "-",
                "reason": (sub.termination_reason.value if sub and sub.termination_reason else "") or "",
                "error": job_error(job),
                "instance": jpd.instance_name if jpd else "-",
                "resources": jpd.resources.pretty() if jpd else "-",
                "started": format_ago(sub.started_at) if sub and sub.started_at else "-",
            }
        )
    return rows


def status_history(run: Run) -> list[dict[str, str]]:
    """What is known of the run's course: submissions of each job, with when they started and ended."""
    events: list[tuple[datetime, str]] = [(run.submitted_at, "run submitted")]
    for job in run.jobs:
        for sub in job.job_submissions:
            who = f"{job.job_spec.job_name} (submission {sub.submission_num})"
            events.append((sub.submitted_at, f"{who} submitted"))
            if sub.started_at:
                events.append((sub.started_at, f"{who} started"))
            if sub.finished_at:
                reason = sub.termination_reason.value if sub.termination_reason else sub.status.value
                events.append((sub.finished_at, f"{who} ended: {reason}"))
    events.sort(key=lambda e: e[0])
    return [{"when": e[0].astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"), "what": e[1]} for e in events]


def configuration_text(run: Run) -> str:
    """The (redacted) configuration as indented JSON."""
    return json.dumps(run.run_spec.configuration, indent=2, sort_keys=True, default=str)
