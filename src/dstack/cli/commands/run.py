"""`dstack run WORKING_DIR -f FILE`: plan, confirm, submit, follow. `apply` reuses `execute`."""

from __future__ import annotations

import argparse
import os
from typing import Any

from dstack.cli.common import add_project_option


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags `run` and `apply` share."""
    p.add_argument(
        "-n", "--name", dest="run_name", help="the run name (default: the configuration's `name`, else random)"
    )
    p.add_argument("-d", "--detach", action="store_true", help="submit and exit without waiting or showing logs")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument(
        "-e",
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set an environment variable (repeatable); a bare KEY takes the value from your environment",
    )
    p.add_argument("--gpu", metavar="SPEC", help="GPU requirement, e.g. 24GB, A100:2, H100:80GB:8")
    p.add_argument("--cpu", metavar="RANGE", help="CPU count, e.g. 4 or 4..")
    p.add_argument("--memory", metavar="RANGE", help="memory, e.g. 16GB..")
    p.add_argument("--disk", metavar="RANGE", help="disk, e.g. 100GB..")
    p.add_argument("--max-offers", type=int, default=3, metavar="N", help="how many offers to show (default: 3)")
    add_project_option(p)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run a configuration from a working directory",
        description="Plan a run of a configuration, confirm, submit it and follow its logs. "
        "Exit codes: 0 done (or detached), 1 failed/terminated or an error, 2 usage, 130 interrupted and stopped.",
    )
    p.add_argument("working_dir", metavar="WORKING_DIR", help="the directory whose code the run gets")
    p.add_argument("-f", "--file", dest="file", help="the configuration file (default: WORKING_DIR/.dstack.yml)")
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from dstack.cli.common import EXIT_USAGE, fail

    working_dir = os.path.abspath(args.working_dir)
    if not os.path.isdir(working_dir):
        fail(f"{args.working_dir} is not a directory", EXIT_USAGE)
    path = args.file or _default_file(working_dir)
    return execute(args, path, working_dir)


def _default_file(working_dir: str) -> str:
    for name in (".dstack.yml", ".dstack.yaml"):
        candidate = os.path.join(working_dir, name)
        if os.path.exists(candidate):
            return candidate
    from dstack.cli.common import EXIT_USAGE, fail

    fail(f"no .dstack.yml in {working_dir}; pass the configuration with -f FILE", EXIT_USAGE)


def apply_overrides(configuration: Any, args: argparse.Namespace) -> Any:
    """Apply `-e` and resource flags; invalid values are usage errors naming the flag."""
    from pydantic import ValidationError

    from dstack.cli.common import EXIT_USAGE, fail
    from dstack.core.models.common import parse_env
    from dstack.core.models.resources import GPUSpec, Memory, Range

    update: dict[str, Any] = {}
    if args.env:
        try:
            extra = parse_env(list(args.env))
        except (ValueError, ValidationError) as e:
            fail(f"invalid -e value: {e}", EXIT_USAGE)
        update["env"] = {**dict(configuration.env or {}), **extra}
    res_update: dict[str, Any] = {}
    parsers = {"gpu": GPUSpec, "cpu": Range[int], "memory": Range[Memory], "disk": Range[Memory]}
    for flag, model in parsers.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        try:
            res_update[flag] = model.model_validate(value)
        except (ValueError, ValidationError) as e:
            msg = e.errors()[0]["msg"] if isinstance(e, ValidationError) else str(e)
            fail(f"invalid --{flag} {value!r}: {msg}", EXIT_USAGE)
    if res_update:
        update["resources"] = configuration.resources.model_copy(update=res_update)
    return configuration.model_copy(update=update) if update else configuration


def execute(args: argparse.Namespace, path: str, working_dir: str) -> int:
    """Load, override, plan, confirm, apply, follow."""
    from dstack.cli.attach import follow_run
    from dstack.cli.common import EXIT_ERROR, ask_yes_no, console, error, fail, get_client
    from dstack.cli.views import configuration_type, no_offers_reason, print_plan
    from dstack.core.yaml_loader import load_configuration

    if not os.path.exists(path):
        fail(f"configuration file {path} does not exist", 2)
    if args.run_name is not None:
        from dstack.core.names import name_error

        problem = name_error("run", args.run_name)
        if problem is not None:
            fail(f"-n/--name: {problem}", 2)
    configuration = load_configuration(path)
    configuration = apply_overrides(configuration, args)
    client = get_client(args.project)
    run_name: str | None = args.run_name
    rel_path = os.path.relpath(path, working_dir) if _inside(path, working_dir) else path
    out = console()
    with out.status("Getting the run plan...") if out.is_terminal else _nullcontext():
        plan = client.runs.get_run_plan(
            configuration, repo_dir=working_dir, configuration_path=rel_path, run_name=run_name
        )
    print_plan(plan, configuration, rel_path, max(args.max_offers, 0))
    reason = no_offers_reason(plan)
    if reason is not None:
        error(f"no offers: {reason}")
        return EXIT_ERROR
    if not args.yes:
        import sys

        if not sys.stdin.isatty():
            fail("not confirmed: stdin is not a terminal; pass -y to submit without asking")
        if not ask_yes_no("Continue?"):
            out.print("Cancelled.")
            return EXIT_ERROR
    run = client.runs.apply_plan(plan)
    return follow_run(run, configuration_type(configuration), args.detach)


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    return os.path.commonpath([path, directory]) == directory


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
