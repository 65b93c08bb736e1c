"""`dstack init`: register the current directory as a repo of the project."""

from __future__ import annotations

import argparse
import os

from dstack.cli.common import add_project_option


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "init", help="register the current directory as a repo", description="Register the current directory as a repo."
    )
    add_project_option(p)
    p.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    from dstack.cli.common import console, escape, get_client

    client = get_client(args.project)
    repo_dir = os.getcwd()
    client.repos.init(repo_dir=repo_dir)
    console().print(f"[green]OK[/] {escape(repo_dir)} is initialized in project [bold]{escape(client.project)}[/]")
    return 0
