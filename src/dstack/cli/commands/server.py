"""`dstack server`: start the control plane (the only command that imports server code)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("server", help="start the dstack server", description="Start the dstack server.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=3000, help="port to listen on (default: 3000)")
    p.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level (default: info)",
    )
    p.set_defaults(func=cmd_server)


def cmd_server(args: argparse.Namespace) -> int:
    from dstack.cli.common import fail
    from dstack.server.main import run_server
    from dstack.server.settings import SettingsError

    try:
        run_server(args.host, args.port, args.log_level)
    except SettingsError as e:  # a DSTACK_* variable the server cannot use: say which, no traceback
        fail(str(e))
    return 0
