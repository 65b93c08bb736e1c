"""`dstack metrics RUN [-w]`: each job's CPU, memory and GPU use, once or refreshed like `top`.

CPU is in percent of one core (a busy single-threaded loop reads about 100%); memory is the RSS of
the job's processes against what it reserved; GPU columns show each of the job's GPUs.
"""

from __future__ import annotations

import argparse
from typing import Any

from dstack.cli.common import add_project_option

WATCH_INTERVAL_SECONDS = 2.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "metrics",
        help="show a run's CPU, memory and GPU use",
        description="Show each job's CPU (percent of one core), memory and GPU use; -w refreshes until Ctrl-C.",
    )
    p.add_argument("run", metavar="RUN", help="the run name")
    p.add_argument("-w", "--watch", action="store_true", help="refresh every 2 seconds until Ctrl-C, like top")
    p.add_argument("--replica", type=int, default=None, help="only this replica")
    p.add_argument("--job", type=int, default=None, help="only this job number")
    add_project_option(p)
    p.set_defaults(func=cmd_metrics)


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024:
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}TB"


def _rows(client: Any, run_name: str, replica: int | None, job_num: int | None) -> list[list[str]]:
    from dstack.cli.common import fail, status_value

    run = client.runs.get(run_name)
    if run is None:
        fail(f"run {run_name!r} is not found in project {client.project!r}")
    jobs = [
        j
        for j in run.jobs
        if (replica is None or j.job_spec.replica_num == replica) and (job_num is None or j.job_spec.job_num == job_num)
    ]
    if not jobs:
        fail(f"run {run_name!r} has no job with replica={replica} job={job_num}")
    rows = []
    for job in jobs:
        spec = job.job_spec
        m = client.metrics.get_job_metrics(run_name, replica_num=spec.replica_num, job_num=spec.job_num)
        status = status_value(job.job_submissions[-1].status) if job.job_submissions else "-"
        cpu = m.latest("cpu_usage_percent")
        cpus = m.latest("cpus_detected_num")
        mem, mem_total = m.latest("memory_usage_bytes"), m.latest("memory_total_bytes")
        gpus = []
        for metric in m.metrics:
            if metric.name.startswith("gpu_util_percent_gpu") and metric.values:
                i = metric.name.removeprefix("gpu_util_percent_gpu")
                used = m.latest(f"gpu_memory_usage_bytes_gpu{i}")
                gpus.append(f"gpu{i} {metric.values[0]:.0f}% {_bytes(used)}")
        rows.append(
            [
                f"replica={spec.replica_num} job={spec.job_num}",
                status,
                "-" if cpu is None else f"{cpu:.0f}%" + (f" of {cpus * 100}%" if cpus else ""),
                _bytes(mem) + (f" / {_bytes(mem_total)}" if mem_total else ""),
                ", ".join(gpus) or "-",
            ]
        )
    return rows


COLUMNS = ["JOB", "STATUS", "CPU", "MEMORY", "GPU"]


def _table(run_name: str, rows: list[list[str]]) -> Any:
    from rich.table import Table

    table = Table(title=f"{run_name}", title_justify="left", box=None, pad_edge=False)
    for c in COLUMNS:
        table.add_column(c, style="bold" if c == "JOB" else None, no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def cmd_metrics(args: argparse.Namespace) -> int:
    import time

    from dstack.cli.common import console, get_client, render_table, use_color

    client = get_client(args.project)
    rows = _rows(client, args.run, args.replica, args.job)
    if not args.watch:
        print(render_table(COLUMNS, [[(c, "") for c in row] for row in rows], use_color()))
        return 0
    from rich.live import Live

    try:
        with Live(_table(args.run, rows), console=console(), refresh_per_second=4, auto_refresh=False) as live:
            while True:
                time.sleep(WATCH_INTERVAL_SECONDS)
                live.update(_table(args.run, _rows(client, args.run, args.replica, args.job)), refresh=True)
    except KeyboardInterrupt:
        return 0
