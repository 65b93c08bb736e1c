"""`dstack secret [list] | set NAME [VALUE] | get NAME | delete NAME...`: the project's secrets.

Configurations use them as `${{ secrets.NAME }}` in `env` values and `registry_auth`. `set`
without VALUE reads it from the terminal without echo (or from stdin when piped), which keeps it
out of the shell's history and the process list.
"""

from __future__ import annotations

import argparse

from dstack.cli.common import add_project_option


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "secret",
        help="manage the project's secrets",
        description="Manage the project's secrets (project admins and managers). Use them in configurations "
        "as ${{ secrets.NAME }} in env values and registry_auth.",
    )
    add_project_option(p)
    p.set_defaults(func=cmd_list)
    ssub = p.add_subparsers(dest="secret_command", metavar="SUBCOMMAND")

    ls = ssub.add_parser("list", help="list secrets (names only)")
    add_project_option(ls, subcommand=True)
    ls.set_defaults(func=cmd_list)

    s = ssub.add_parser("set", help="create or update a secret")
    s.add_argument("name", metavar="NAME")
    s.add_argument("value", metavar="VALUE", nargs="?", help="default: read from the terminal (no echo) or stdin")
    add_project_option(s, subcommand=True)
    s.set_defaults(func=cmd_set)

    g = ssub.add_parser("get", help="show a secret's value")
    g.add_argument("name", metavar="NAME")
    add_project_option(g, subcommand=True)
    g.set_defaults(func=cmd_get)

    d = ssub.add_parser("delete", help="delete secrets")
    d.add_argument("names", nargs="+", metavar="NAME")
    d.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    add_project_option(d, subcommand=True)
    d.set_defaults(func=cmd_delete)


def cmd_list(args: argparse.Namespace) -> int:
    from dstack.cli.common import console, get_client, render_table, use_color

    secrets = get_client(args.project).secrets.list()
    if not secrets:
        console().print("No secrets. Set one with 'dstack secret set NAME'.")
        return 0
    rows = [[(s.name, "bold"), ("******", "grey62")] for s in secrets]
    print(render_table(["NAME", "VALUE"], rows, use_color()))
    return 0


def _read_value() -> str:
    import getpass
    import sys

    from dstack.cli.common import fail

    if sys.stdin.isatty():
        return getpass.getpass("Value: ")
    value = sys.stdin.read()
    if not value:
        fail("no value: give VALUE, type it at the prompt, or pipe it on stdin")
    return value[:-1] if value.endswith("\n") else value


def cmd_set(args: argparse.Namespace) -> int:
    from dstack.cli.common import console, escape, get_client

    value = args.value if args.value is not None else _read_value()
    get_client(args.project).secrets.create_or_update(args.name, value)
    console().print(f"[green]OK[/] secret [bold]{escape(args.name)}[/] set")
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from dstack.cli.common import get_client, render_table, use_color

    secret = get_client(args.project).secrets.get(args.name)
    print(render_table(["NAME", "VALUE"], [[(secret.name, "bold"), (secret.value or "", "")]], use_color()))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    import sys

    from dstack.cli.common import EXIT_ERROR, ask_yes_no, console, escape, fail, get_client

    client = get_client(args.project)
    if not args.yes:
        if not sys.stdin.isatty():
            fail("not confirmed: stdin is not a terminal; pass -y to delete without asking")
        if not ask_yes_no(f"Delete the secret{'s' if len(args.names) > 1 else ''} {', '.join(args.names)}?"):
            console().print("Cancelled.")
            return EXIT_ERROR
    client.secrets.delete(args.names)
    console().print(f"[green]OK[/] deleted {escape(', '.join(args.names))}")
    return 0
