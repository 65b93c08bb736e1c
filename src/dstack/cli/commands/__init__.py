"""One module per CLI command; each exposes `register(subparsers)` and sets `func` on its parser.

Command modules import only `argparse` at module level so building the parser stays cheap.
"""

from dstack.cli.commands import (
    apply,
    attach,
    config,
    fleet,
    gateway,
    init,
    logs,
    metrics,
    ps,
    run,
    secret,
    server,
    stop,
    volume,
)

COMMANDS = (server, init, config, run, apply, attach, ps, stop, logs, metrics, secret, gateway, fleet, volume)

__all__ = ["COMMANDS"]
