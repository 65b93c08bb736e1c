"""`dstack stop RUN`: stop (or abort) runs and wait briefly for them to end."""

from __future__ import annotations

import argparse

from dstack.cli.common import add_project_option

STOP_WAIT_SECONDS = 60.0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("stop", help="stop runs", description="Stop runs: graceful by default, at once with -x.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="the run name(s)")
    p.add_argument("-x", "--abort", action="store_true", help="kill at once instead of a graceful stop")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    add_project_option(p)
    p.set_defaults(func=cmd_stop)


def cmd_stop(args: argparse.Namespace) -> int:
    import sys

    from dstack.cli.attach import _is_finished, wait_until
    from dstack.cli.common import EXIT_ERROR, ask_yes_no, console, error, escape, fail, get_client, styled_status

    client = get_client(args.project)
    runs = []
    for name in args.runs:
        run = client.runs.get(name)
        if run is None:
            fail(f"run {name!r} is not found in project {client.project!r}")
        runs.append(run)
    verb = "Abort" if args.abort else "Stop"
    if not args.yes:
        if not sys.stdin.isatty():
            fail("not confirmed: stdin is not a terminal; pass -y to stop without asking")
        if not ask_yes_no(f"{verb} {', '.join(r.name for r in runs)}?"):
            console().print("Cancelled.")
            return EXIT_ERROR
    out = console()
    code = 0
    for run in runs:
        if _is_finished(run):
            out.print(f"Run [bold]{escape(run.name)}[/] is already {styled_status(run.status)}")
            continue
        run.stop(abort=args.abort)
        if wait_until(run, _is_finished, "Aborting" if args.abort else "Stopping", timeout=STOP_WAIT_SECONDS):
            out.print(f"Run [bold]{escape(run.name)}[/] is {styled_status(run.status)}")
        else:
            error(
                f"run {run.name} is still {run.status.value} after {STOP_WAIT_SECONDS:.0f}s; try 'dstack stop -x {run.name}'"
            )
            code = EXIT_ERROR
    return code
