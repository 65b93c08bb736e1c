"""`dstack gateway create|list|delete`: manage gateways through `client.gateways`.

`create` starts a gateway process on the server's host: services are then published at
`https://<run>.<domain>[:port]/` and models at `https://gateway.<domain>[:port]/v1`.
"""

from __future__ import annotations

import argparse
from typing import Any

from dstack.cli.common import add_project_option


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("gateway", help="manage gateways", description="Manage gateways.")
    gsub = p.add_subparsers(dest="gateway_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: _usage(p))

    c = gsub.add_parser("create", help="create a gateway")
    c.add_argument("--name", required=True, help="the gateway name")
    c.add_argument("--backend", default="local", help="where the gateway runs (default: local)")
    c.add_argument("--region", default=None, help="the backend's region")
    c.add_argument("--domain", required=True, help="the wildcard domain services get hostnames under")
    c.add_argument("--port", type=int, default=None, help="the port it listens on (default: 443 with TLS, else 80)")
    c.add_argument(
        "--host",
        default=None,
        help="the address it binds (default: 0.0.0.0 for global admins, else 127.0.0.1; only admins bind non-loopback)",
    )
    c.add_argument("--tls-cert", default=None, help="certificate (PEM) for *.DOMAIN, a local file sent to the server")
    c.add_argument("--tls-key", default=None, help="its private key (PEM)")
    c.add_argument(
        "--default",
        action="store_true",
        help="make it the project's default gateway (the project's first gateway is the default)",
    )
    add_project_option(c)
    c.set_defaults(func=cmd_create)

    ls = gsub.add_parser("list", help="list gateways")
    add_project_option(ls)
    ls.set_defaults(func=cmd_list)

    d = gsub.add_parser("delete", help="delete gateways")
    d.add_argument("names", nargs="+", metavar="NAME")
    d.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    add_project_option(d)
    d.set_defaults(func=cmd_delete)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def _gateways(args: argparse.Namespace) -> Any:
    from dstack.cli.common import fail, get_client

    client = get_client(args.project)
    gateways = getattr(client, "gateways", None)
    if gateways is None:
        fail("gateways are not implemented yet")
    return gateways


def cmd_create(args: argparse.Namespace) -> int:
    from dstack.cli.common import console, escape, fail

    if bool(args.tls_cert) != bool(args.tls_key):
        fail("--tls-cert and --tls-key go together")
    gw = _gateways(args).create(
        name=args.name,
        backend=args.backend,
        region=args.region,
        domain=args.domain,
        default=args.default,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        host=args.host,
    )
    console().print(f"[green]OK[/] gateway [bold]{escape(getattr(gw, 'name', args.name))}[/] created")
    url = getattr(gw, "url", None)
    if url:
        console().print(
            f"Services are published at [bold]{escape(url.replace('://gateway.', '://<run>.', 1))}/[/], "
            f"models at [bold]{escape(url)}/v1[/]"
        )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from dstack.cli.common import console, escape

    items = list(_gateways(args).list())
    if not items:
        console().print("No gateways.")
        return 0
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "BACKEND", "REGION", "HOSTNAME", "DOMAIN", "DEFAULT", "STATUS"):
        table.add_column(col)
    for g in items:
        table.add_row(
            escape(getattr(g, "name", "-")),
            escape(getattr(g, "backend", "-") or "-"),
            escape(getattr(g, "region", "-") or "-"),
            escape(getattr(g, "hostname", "-") or "-"),
            escape(getattr(g, "wildcard_domain", None) or getattr(g, "domain", None) or "-"),
            "yes" if getattr(g, "default", False) else "",
            escape(getattr(getattr(g, "status", None), "value", getattr(g, "status", "-")) or "-"),
        )
    console().print(table)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    import sys

    from dstack.cli.common import EXIT_ERROR, ask_yes_no, console, escape, fail

    gateways = _gateways(args)
    if not args.yes:
        if not sys.stdin.isatty():
            fail("not confirmed: stdin is not a terminal; pass -y to delete without asking")
        if not ask_yes_no(f"Delete gateway(s) {', '.join(args.names)}?"):
            console().print("Cancelled.")
            return EXIT_ERROR
    gateways.delete(args.names)
    console().print(f"[green]OK[/] deleted {escape(', '.join(args.names))}")
    return 0
