"""Core benchmark: submit → RUNNING / DONE latency, 100 runs at once, and listing with 10,000 runs stored.

Runs a real server on a free port in a temporary home and compares against the direct call
(`bash -c 'echo hi'` as a subprocess), printing ratios. Usage: python bench/bench_core.py [--runs 50]
"""

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"), str(Path(__file__).resolve().parents[1])]
from conftest import make_server  # noqa: E402

from dstack.api import Resources, RunStatus, Task  # noqa: E402


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def fmt(values: list[float]) -> str:
    return f"p50 {pct(values, 50) * 1000:7.1f} ms  p99 {pct(values, 99) * 1000:7.1f} ms"


def direct_echo(n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(["bash", "-c", "echo hi"], capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return times


def submit_latencies(client, n: int) -> tuple[list[float], list[float]]:
    to_running, to_done = [], []
    task = Task(commands=["echo hi"], resources=Resources(cpu=1, memory="0.5GB"))
    for _ in range(n):
        t0 = time.perf_counter()
        run = client.runs.submit(task)
        running_at = None
        while True:
            run.refresh()
            if running_at is None and run.status in (RunStatus.RUNNING, RunStatus.DONE):
                running_at = time.perf_counter()
            if run.status.is_finished():
                break
            time.sleep(0.005)
        to_running.append(running_at - t0)
        to_done.append(time.perf_counter() - t0)
        assert run.status == RunStatus.DONE, run.error
    return to_running, to_done


def burst(client, n: int) -> float:
    task = Task(
        commands=["echo hi"],
        resources=Resources(cpu=1, memory="0.1GB"),
        retry={"on_events": ["no-capacity"], "duration": "10m"},
    )
    t0 = time.perf_counter()
    runs = [client.runs.submit(task) for _ in range(n)]
    pending = {r.name: r for r in runs}
    while pending:
        for name, r in list(pending.items()):
            r.refresh()
            if r.status.is_finished():
                assert r.status == RunStatus.DONE, (r.name, r.error)
                del pending[name]
        time.sleep(0.05)
    return time.perf_counter() - t0


async def store_runs(database_url: str, project_name: str, user_name: str, n: int) -> None:
    """Insert finished runs straight into the database (running 10,000 real jobs would take an hour)."""
    from sqlalchemy import select

    from dstack.core.models.runs import JobSpec, RunSpec
    from dstack.server.db import Database
    from dstack.server.models import JobModel, ProjectModel, RunModel, UserModel

    db = Database(database_url)
    async with db.session() as s:
        project = (await s.execute(select(ProjectModel).where(ProjectModel.name == project_name))).scalar_one()
        user = (await s.execute(select(UserModel).where(UserModel.name == user_name))).scalar_one()
        spec = RunSpec(run_name="x", configuration={"type": "task", "commands": ["echo hi"]}).model_dump_json()
        for i in range(n):
            run = RunModel(
                project_id=project.id,
                user_id=user.id,
                run_name=f"stored-{i}",
                status="done",
                termination_reason="all_jobs_done",
                run_spec=spec,
            )
            s.add(run)
            await s.flush()
            s.add(
                JobModel(
                    run_id=run.id,
                    project_id=project.id,
                    job_name=f"stored-{i}-0-0",
                    status="done",
                    job_spec=JobSpec(job_name=f"stored-{i}-0-0", commands=["echo hi"]).model_dump_json(),
                )
            )
            if i % 1000 == 999:
                await s.commit()
        await s.commit()
    await db.dispose()


def time_it(fn, repeat: int = 5) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--burst", type=int, default=100)
    ap.add_argument("--stored", type=int, default=10_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dstack-bench-"))
    srv = make_server(tmp)
    srv.start()
    try:
        client = srv.client()
        direct = direct_echo(args.runs)
        to_running, to_done = submit_latencies(client, args.runs)
        print(f"direct `bash -c 'echo hi'`      {fmt(direct)}")
        print(
            f"submit -> RUNNING ({args.runs} runs)    {fmt(to_running)}   (target p50 <= 500 ms; dstack's loops tick every 2-4 s)"
        )
        print(
            f"submit -> DONE    ({args.runs} runs)    {fmt(to_done)}   ratio to direct p50: {pct(to_done, 50) / pct(direct, 50):.1f}x"
        )
        total = burst(client, args.burst)
        print(f"{args.burst} runs submitted at once: all DONE after {total:.2f} s ({args.burst / total:.1f} runs/s)")
        srv.stop()
        asyncio.run(
            store_runs(
                f"sqlite+aiosqlite:///{srv.home / 'server' / 'data' / 'sqlite.db'}", "main", "admin", args.stored
            )
        )
        srv.start()
        client = srv.client()
        env = srv.env
        ps = time_it(
            lambda: subprocess.run(
                [sys.executable, "-m", "dstack.cli.main", "ps"], env=env, capture_output=True, check=True
            )
        )
        ps_all = time_it(
            lambda: subprocess.run(
                [sys.executable, "-m", "dstack.cli.main", "ps", "-a"], env=env, capture_output=True, check=True
            )
        )
        py = time_it(lambda: subprocess.run([sys.executable, "-c", "pass"], capture_output=True, check=True))
        lst = time_it(lambda: client.runs.list())
        lst_all = time_it(lambda: client.runs.list(all=True))
        print(f"with {args.stored} runs stored:")
        print(
            f"  `dstack ps`               median {statistics.median(ps) * 1000:6.0f} ms (bare `python -c pass`: {statistics.median(py) * 1000:.0f} ms)  target <= 300 ms"
        )
        print(f"  `dstack ps -a`            median {statistics.median(ps_all) * 1000:6.0f} ms")
        print(f"  runs.list()               median {statistics.median(lst) * 1000:6.0f} ms  target <= 300 ms")
        print(
            f"  runs.list(all=True)       median {statistics.median(lst_all) * 1000:6.0f} ms ({len(client.runs.list(all=True))} runs)"
        )
    finally:
        srv.stop()
        srv.kill_agents()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
