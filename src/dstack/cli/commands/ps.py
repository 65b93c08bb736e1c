"""`dstack ps`: a table of runs, with jobs and replicas nested beneath multi-job runs."""

from __future__ import annotations

import argparse
from typing import Any, Iterator


def register(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "ps",
        help="list runs",
        description="List runs: the active ones and the last few finished (all with -a).",
    )
    p.add_argument("-a", "--all", action="store_true", help="show all runs, not only active and recent ones")
    p.add_argument("-v", "--verbose", action="store_true", help="more columns (INSTANCE, ERROR always)")
    p.add_argument("-w", "--watch", action="store_true", help="refresh the table until Ctrl-C")
    p.add_argument("-n", "--last", type=int, default=None, metavar="N", help="show at most the last N runs")
    p.add_argument("--project", help="the project (default: the default project in ~/.dstack/config.yml)")
    p.set_defaults(func=cmd_ps)


Row = tuple[str, ...]


def _job_label(job: Any, multi_replica: bool, multi_node: bool) -> str:
    spec = job.job_spec
    parts = []
    if multi_replica:
        parts.append(f"replica={spec.replica_num}")
    if multi_node or not parts:
        parts.append(f"job={spec.job_num}")
    return "  " + " ".join(parts)


def _provisioning(job: Any) -> tuple[str, str, str, str]:
    """(backend, resources, price, instance) of the job's latest submission."""
    from dstack.cli.common import escape, format_price, resources_text
    from dstack.cli.views import latest_submission

    sub = latest_submission(job)
    jpd = getattr(sub, "job_provisioning_data", None) if sub is not None else None
    if jpd is None:
        return "-", "-", "-", "-"
    backend = escape(jpd.backend)
    region = getattr(jpd, "region", None)
    if region and region != jpd.backend:
        backend += f" ({escape(region)})"
    instance = getattr(jpd, "instance_name", None) or getattr(jpd, "instance_type", None) or "-"
    return backend, escape(resources_text(jpd.resources)), format_price(jpd.price), escape(instance)


def rows(runs: list[Any], verbose: bool) -> Iterator[tuple[Row, bool]]:
    """(cells, is_run_row) for each line: NAME BACKEND RESOURCES PRICE STATUS SUBMITTED INSTANCE ERROR."""
    from dstack.cli.common import escape, format_ago, styled_status
    from dstack.cli.views import job_error, latest_submission, run_error

    for run in runs:
        jobs = sorted(run.jobs or [], key=lambda j: (j.job_spec.replica_num, j.job_spec.job_num))
        error = escape(run_error(run))
        name = f"[bold]{escape(run.name)}[/]"
        submitted = format_ago(run.submitted_at)
        if len(jobs) <= 1:
            backend, resources, price, instance = _provisioning(jobs[0]) if jobs else ("-", "-", "-", "-")
            yield (name, backend, resources, price, styled_status(run.status), submitted, instance, error), True
        else:
            yield (name, "", "", "", styled_status(run.status), submitted, "", error), True
            multi_replica = len({j.job_spec.replica_num for j in jobs}) > 1
            multi_node = len({j.job_spec.job_num for j in jobs}) > 1
            for job in jobs:
                sub = latest_submission(job)
                backend, resources, price, instance = _provisioning(job)
                yield (
                    _job_label(job, multi_replica, multi_node),
                    backend,
                    resources,
                    price,
                    styled_status(getattr(sub, "status", "-")),
                    format_ago(getattr(sub, "submitted_at", None)),
                    instance,
                    escape(job_error(job)),
                ), False
        url = getattr(run, "service_url", None)
        if url:
            yield (f"  [dim]{escape(url)}[/]", "", "", "", "", "", "", ""), False


def build_table(runs: list[Any], verbose: bool) -> Any:
    from rich.table import Table

    all_rows = list(rows(runs, verbose))
    show_error = verbose or any(r[7] for r, _ in all_rows)
    table = Table(box=None, header_style="bold", pad_edge=False, show_edge=False)
    columns = ["NAME", "BACKEND", "RESOURCES", "PRICE", "STATUS", "SUBMITTED"]
    if verbose:
        columns.append("INSTANCE")
    if show_error:
        columns.append("ERROR")
    for col in columns:
        table.add_column(col, no_wrap=col not in ("RESOURCES", "ERROR"))
    for cells, _ in all_rows:
        picked = list(cells[:6])
        if verbose:
            picked.append(cells[6])
        if show_error:
            picked.append(cells[7])
        table.add_row(*picked)
    return table


def _fetch(client: Any, args: argparse.Namespace) -> list[Any]:
    runs = client.runs.list(all=args.all, limit=args.last)
    return list(runs)


def cmd_ps(args: argparse.Namespace) -> int:
    from dstack.cli.common import console, get_client

    client = get_client(args.project)
    out = console()
    if not args.watch:
        runs = _fetch(client, args)
        if not runs:
            out.print("No runs." + ("" if args.all else " Use -a to show finished ones."))
            return 0
        out.print(build_table(runs, args.verbose))
        return 0
    import time

    from rich.live import Live

    try:
        with Live(build_table(_fetch(client, args), args.verbose), console=out, auto_refresh=False) as live:
            while True:
                time.sleep(2)
                live.update(build_table(_fetch(client, args), args.verbose), refresh=True)
    except KeyboardInterrupt:
        return 0
