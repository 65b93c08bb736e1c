"""`dstack apply -f FILE`: like `run`, with the working directory implied.

The code comes from the current directory when FILE lies inside it (the usual "repo root"
case), else from FILE's own folder.
"""

from __future__ import annotations

import argparse
import os

from dstack.cli.commands.run import add_run_arguments


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "apply",
        help="apply a configuration",
        description="Plan a configuration, confirm, submit it and follow its logs. The code comes from the "
        "current directory if FILE is inside it, else from FILE's folder. "
        "Exit codes: 0 done (or detached), 1 failed/terminated or an error, 2 usage, 130 interrupted and stopped.",
    )
    p.add_argument("-f", "--file", dest="file", help="the configuration file (default: ./.dstack.yml)")
    add_run_arguments(p)
    p.set_defaults(func=cmd_apply)


def cmd_apply(args: argparse.Namespace) -> int:
    from dstack.cli.commands.run import _default_file, _inside, execute

    path = os.path.abspath(args.file) if args.file else _default_file(os.getcwd())
    from dstack.cli.commands.fleet import apply_fleet, is_fleet_file

    if is_fleet_file(path):  # `type: fleet` is not a run
        return apply_fleet(args, path)
    from dstack.cli.commands.volume import apply_volume, is_volume_file

    if is_volume_file(path):  # nor is `type: volume`
        return apply_volume(args, path)
    cwd = os.getcwd()
    working_dir = cwd if _inside(path, cwd) else os.path.dirname(path)
    return execute(args, path, working_dir)
