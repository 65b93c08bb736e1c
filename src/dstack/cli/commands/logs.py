"""`dstack logs RUN`: print a job's logs, optionally following them."""

from __future__ import annotations

import argparse

from dstack.cli.common import add_project_option


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("logs", help="show a run's logs", description="Print the logs of a run's job.")
    p.add_argument("run", metavar="RUN", help="the run name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new logs until the job ends")
    p.add_argument("-a", "--attach", action="store_true", help="attach (forward ports) and follow")
    p.add_argument("-d", "--diagnose", action="store_true", help="show the agent's diagnostic logs instead")
    p.add_argument("--replica", type=int, default=0, metavar="N", help="the replica (default: 0)")
    p.add_argument("--job", type=int, default=0, metavar="N", help="the job within the replica (default: 0)")
    add_project_option(p)
    p.set_defaults(func=cmd_logs)


def cmd_logs(args: argparse.Namespace) -> int:
    from dstack.cli.attach import stream_logs
    from dstack.cli.common import fail, get_client

    client = get_client(args.project)
    run = client.runs.get(args.run)
    if run is None:
        fail(f"run {args.run!r} is not found in project {client.project!r}")
    follow = args.follow or args.attach
    extra = {"diagnose": True} if args.diagnose else {}
    if args.attach:
        run.attach()
    try:
        stream_logs(run, replica_num=args.replica, job_num=args.job, follow=follow, **extra)
    except TypeError as e:
        if args.diagnose and "diagnose" in str(e):
            fail("diagnostic logs are not supported by this version of the API")
        raise
    finally:
        if args.attach:
            try:
                run.detach()
            except Exception:
                pass
    return 0
