"""`dstack config`: add a server/project to ~/.dstack/config.yml, or show what is there."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "config",
        help="configure the server and project the CLI talks to",
        description="With --url, --project and --token: add (or replace) a project in ~/.dstack/config.yml. "
        "Without arguments: list the configured projects.",
    )
    p.add_argument("--url", help="the server URL, e.g. http://127.0.0.1:3000")
    p.add_argument("--project", help="the project name")
    p.add_argument("--token", help="the user's token")
    p.add_argument("--no-default", action="store_true", help="do not make this project the default")
    p.set_defaults(func=cmd_config)


def cmd_config(args: argparse.Namespace) -> int:
    from dstack.api.config import ConfigError, add_project, config_path, load_config
    from dstack.cli.common import EXIT_USAGE, console, escape, fail

    given = [x for x in (args.url, args.project, args.token) if x]
    if given and len(given) < 3:
        fail("--url, --project and --token go together", EXIT_USAGE)
    try:
        if given:
            project = add_project(args.project, args.url, args.token, default=not args.no_default)
            console().print(
                f"[green]OK[/] project [bold]{escape(project.name)}[/] at {escape(project.url)} written to {escape(config_path())}"
                + (" (default)" if project.default else "")
            )
            return 0
        cfg = load_config()
    except ConfigError as e:
        fail(str(e))
    if not cfg.projects:
        console().print(f"No projects configured in {escape(config_path())}.")
        console().print(
            "Start a server with 'dstack server' or run 'dstack config --url URL --project NAME --token TOKEN'."
        )
        return 0
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("PROJECT", "URL", "TOKEN", "DEFAULT"):
        table.add_column(col)
    for p in cfg.projects:
        masked = p.token[:4] + "…" if len(p.token) > 8 else "****"
        table.add_row(escape(p.name), escape(p.url), masked, "yes" if p.default else "")
    console().print(table)
    return 0
