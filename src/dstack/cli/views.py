"""Renderings of API objects for the terminal: the run plan, run errors, job rows.

Only attribute access on API objects happens here (with `getattr` where the API may still be
growing), so commands stay about flow and these stay about looks.
"""

from __future__ import annotations

from typing import Any

from dstack.cli.common import console, escape, format_price, resources_text
from dstack.core.exit_status import exit_error


def latest_submission(job: Any) -> Any:
    subs = getattr(job, "job_submissions", None) or []
    return subs[-1] if subs else None


def job_error(job: Any) -> str:
    """Why a job ended badly: `exit status 3`, or its termination reason and message."""
    sub = latest_submission(job)
    if sub is None:
        return ""
    reason = _value(getattr(sub, "termination_reason", None))
    exit_status = getattr(sub, "exit_status", None)
    message = getattr(sub, "termination_reason_message", None)
    if reason in _NOT_ERRORS:
        return ""  # a stop someone asked for (or a normal end) is not an error
    if exit_status not in (None, 0) and reason in (None, "container_exited_with_error"):
        return exit_error(exit_status, message)
    if reason is None:
        return ""
    text = reason.replace("_", " ")
    return f"{text}: {message}" if message else text


_NOT_ERRORS = frozenset({"done_by_runner", "scaled_down", "terminated_by_user", "aborted_by_user"})


def run_error(run: Any) -> str:
    """Run-level error: the run's own error, else the first failing job's, else a bad reason."""
    status = _value(getattr(run, "status", None))
    if status == "done":
        return ""
    for job in getattr(run, "jobs", None) or []:
        text = job_error(job)
        if text:
            return text
    error = getattr(run, "error", None)
    if error:
        return str(error)
    reason = _value(getattr(run, "termination_reason", None))
    if reason and reason not in ("all_jobs_done", "stopped_by_user", "aborted_by_user"):
        return reason.replace("_", " ")
    return ""


def _value(x: Any) -> str | None:
    if x is None:
        return None
    return str(getattr(x, "value", x))


def configuration_type(configuration: Any) -> str:
    if isinstance(configuration, dict):
        return str(configuration.get("type", "task"))
    return str(getattr(configuration, "type", "task"))


def _retry_text(configuration: Any) -> str:
    from dstack.core.models.common import format_duration

    retry = getattr(configuration, "retry", None)
    if not retry:
        return "no"
    events = ", ".join(getattr(retry, "on_events", []) or [])
    duration = getattr(retry, "duration", None)
    return f"on {events}" + (f" for {format_duration(duration)}" if duration else "")


def print_plan(plan: Any, configuration: Any, configuration_path: str | None, max_offers: int) -> None:
    """The properties table and the offers table (best first, `max_offers` rows)."""
    from rich.table import Table

    from dstack.core.models.common import format_duration

    props = Table(box=None, show_header=False, pad_edge=False)
    props.add_column(style="bold", no_wrap=True)
    props.add_column()
    resources = getattr(configuration, "resources", None)
    max_price = getattr(configuration, "max_price", None)
    job_plans = list(getattr(plan, "job_plans", None) or [])
    if max_price is None and job_plans:
        max_price = getattr(job_plans[0], "max_price", None)
    max_duration = getattr(configuration, "max_duration", None)
    rows = [
        ("Configuration", configuration_path or "-"),
        ("Project", getattr(plan, "project_name", None) or "-"),
        ("User", getattr(plan, "user", None) or "-"),
        ("Type", configuration_type(configuration)),
        ("Resources", resources_text(resources)),
        ("Max price", format_price(max_price) if max_price is not None else "-"),
        ("Max duration", format_duration(max_duration) if max_duration is not None else "-"),
        ("Spot policy", getattr(configuration, "spot_policy", None) or "on-demand"),
        ("Retry", _retry_text(configuration)),
    ]
    run_name = getattr(getattr(plan, "run_spec", None), "run_name", None)
    if run_name:
        rows.insert(0, ("Run", run_name))
    for key, value in rows:
        props.add_row(key, escape(value))
    out = console()
    out.print(props)
    out.print()
    if not job_plans or not job_plans[0].offers:
        return
    jp = job_plans[0]
    offers = list(jp.offers)
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("#", "BACKEND", "REGION", "INSTANCE", "RESOURCES", "SPOT", "PRICE"):
        table.add_column(col, no_wrap=col != "RESOURCES")
    for i, offer in enumerate(offers[:max_offers], start=1):
        instance = escape(getattr(offer, "instance_name", "-"))
        if getattr(offer, "availability", "available") not in (None, "available"):
            instance += f" [dim]({escape(_value(offer.availability))})[/]"
        table.add_row(
            str(i),
            escape(getattr(offer, "backend", "-")),
            escape(getattr(offer, "region", "-")),
            instance,
            escape(resources_text(getattr(offer, "resources", None))),
            "spot" if getattr(offer, "spot", False) else "on-demand",
            format_price(getattr(offer, "price", None)),
        )
    out.print(table)
    total = getattr(jp, "total_offers", None) or len(offers)
    shown = min(max_offers, len(offers))
    if total > shown:
        out.print(f"[dim]... and {total - shown} more[/]")
    out.print()


def no_offers_reason(plan: Any) -> str | None:
    """The server's explanation when the plan has no offers, else None (there are offers)."""
    job_plans = list(getattr(plan, "job_plans", None) or [])
    if job_plans and job_plans[0].offers:
        return None
    reason = job_plans[0].no_offers_reason if job_plans else None
    return reason or "no offers match the requested resources"
