"""`dstack ps`: a table of runs, with jobs and replicas nested beneath multi-job runs.

Rendered with a plain, linear-time table (see `render_table`) so it stays instant however many
rows the server returns.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

from dstack.cli.common import Cell, add_project_option


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "ps",
        help="list runs",
        description="List runs: the active ones and the last few finished (all with -a).",
    )
    p.add_argument("-a", "--all", action="store_true", help="show all runs, not only active and recent ones")
    p.add_argument("-v", "--verbose", action="store_true", help="more columns (INSTANCE, ERROR always)")
    p.add_argument("-w", "--watch", action="store_true", help="refresh the table until Ctrl-C")
    p.add_argument("-n", "--last", type=int, default=None, metavar="N", help="show at most the last N runs")
    add_project_option(p)
    p.set_defaults(func=cmd_ps)


# Cells: NAME BACKEND RESOURCES PRICE STATUS SUBMITTED INSTANCE ERROR
Row = list[Cell]
_EMPTY: Cell = ("", "")


def _status_cell(status: Any) -> Cell:
    from dstack.cli.common import STATUS_STYLES, status_value

    value = status_value(status) or "-"
    return value, STATUS_STYLES.get(value, "")


def _job_label(job: Any, multi_replica: bool, multi_node: bool) -> str:
    spec = job.job_spec
    parts = []
    if multi_replica:
        parts.append(f"replica={spec.replica_num}")
    if multi_node or not parts:
        parts.append(f"job={spec.job_num}")
    return "  " + " ".join(parts)


def _provisioning(job: Any) -> tuple[Cell, Cell, Cell, Cell]:
    """(backend, resources, price, instance) of the job's latest submission."""
    from dstack.cli.common import format_price, resources_text
    from dstack.cli.views import latest_submission

    sub = latest_submission(job)
    jpd = getattr(sub, "job_provisioning_data", None) if sub is not None else None
    if jpd is None:
        return ("-", ""), ("-", ""), ("-", ""), ("-", "")
    backend = str(jpd.backend)
    region = getattr(jpd, "region", None)
    if region and region != jpd.backend:
        backend += f" ({region})"
    instance = getattr(jpd, "instance_name", None) or "-"
    return (backend, ""), (resources_text(jpd.resources), ""), (format_price(jpd.price), ""), (str(instance), "")


def rows(runs: list[Any]) -> Iterator[Row]:
    from dstack.cli.common import format_ago
    from dstack.cli.views import job_error, latest_submission, run_error

    for run in runs:
        jobs = sorted(run.jobs or [], key=lambda j: (j.job_spec.replica_num, j.job_spec.job_num))
        error: Cell = (run_error(run), "red")
        name: Cell = (run.name, "bold")
        submitted: Cell = (format_ago(run.submitted_at), "")
        if len(jobs) <= 1:
            blank = (("-", ""),) * 4
            backend, resources, price, instance = _provisioning(jobs[0]) if jobs else blank
            yield [name, backend, resources, price, _status_cell(run.status), submitted, instance, error]
        else:
            yield [name, _EMPTY, _EMPTY, _EMPTY, _status_cell(run.status), submitted, _EMPTY, error]
            multi_replica = len({j.job_spec.replica_num for j in jobs}) > 1
            multi_node = len({j.job_spec.job_num for j in jobs}) > 1
            for job in jobs:
                sub = latest_submission(job)
                backend, resources, price, instance = _provisioning(job)
                yield [
                    (_job_label(job, multi_replica, multi_node), ""),
                    backend,
                    resources,
                    price,
                    _status_cell(getattr(sub, "status", None)),
                    (format_ago(getattr(sub, "submitted_at", None)), ""),
                    instance,
                    (job_error(job), "red"),
                ]
        url = getattr(run, "service_url", None)
        if url:
            yield [(f"  {url}", "dim")] + [_EMPTY] * 7
        endpoint_url = getattr(run, "endpoint_url", None)
        if endpoint_url and not run.is_finished():
            yield [(f"  {endpoint_url}  {_queue_summary(run)}", "dim")] + [_EMPTY] * 7


def _queue_summary(run: Any) -> str:
    """Serverless endpoints: workers by state and queue depth."""
    extra = run.extra
    workers = extra.get("workers") or {}
    jobs = extra.get("jobs") or {}
    states = ", ".join(f"{k} {v}" for k, v in workers.items() if v and k != "ready") or "none"
    return f"workers: {states}; queue: {jobs.get('inQueue', 0)} waiting, {jobs.get('inProgress', 0)} in progress"


def build_table(runs: list[Any], verbose: bool, color: bool = False) -> str:
    from dstack.cli.common import render_table

    all_rows = list(rows(runs))
    show_error = verbose or any(r[7][0] for r in all_rows)
    keep = [0, 1, 2, 3, 4, 5] + ([6] if verbose else []) + ([7] if show_error else [])
    names = ["NAME", "BACKEND", "RESOURCES", "PRICE", "STATUS", "SUBMITTED", "INSTANCE", "ERROR"]
    return render_table([names[i] for i in keep], [[r[i] for i in keep] for r in all_rows], color)


def _fetch(client: Any, args: argparse.Namespace) -> list[Any]:
    from dstack.api.listing import list_run_views

    return list_run_views(client, all=args.all, limit=args.last)


def cmd_ps(args: argparse.Namespace) -> int:
    import sys

    from dstack.cli.common import get_client, use_color

    client = get_client(args.project)
    if not args.watch:
        runs = _fetch(client, args)
        if not runs:
            print("No runs." + ("" if args.all else " Use -a to show finished ones."))
            return 0
        sys.stdout.write(build_table(runs, args.verbose, use_color()) + "\n")
        return 0
    import time

    from rich.live import Live
    from rich.text import Text

    from dstack.cli.common import console

    def renderable() -> Text:
        return Text.from_ansi(build_table(_fetch(client, args), args.verbose, color=True))

    try:
        with Live(renderable(), console=console(), auto_refresh=False) as live:
            while True:
                time.sleep(2)
                live.update(renderable(), refresh=True)
    except KeyboardInterrupt:
        return 0
