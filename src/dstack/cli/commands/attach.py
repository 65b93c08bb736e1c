"""`dstack attach RUN`: reach a running run from here; `dstack tunnel RUN`: OpenSSH's ProxyCommand.

A dev environment gets a `Host RUN` entry in ~/.dstack/ssh/config (so `ssh RUN` and VS Code work)
and its IDE link; a task or service gets its `ports` forwarded to localhost. Either way the
run's logs are followed until it ends or Ctrl-C (which detaches and leaves it running).
"""

from __future__ import annotations

import argparse

from dstack.cli.common import add_project_option


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "attach",
        help="attach to a running run",
        description="Wait until RUN is running, then: for a dev environment, write its SSH host entry "
        "(`ssh RUN` works) and print its IDE link; for tasks and services, forward their ports to localhost. "
        "Follows the logs until the run ends; Ctrl-C detaches and leaves it running.",
    )
    p.add_argument("run", metavar="RUN", help="the run name")
    add_project_option(p)
    p.add_argument("--no-logs", action="store_true", help="do not follow the logs: set up and wait for Ctrl-C")
    p.set_defaults(func=cmd_attach)
    t = sub.add_parser(
        "tunnel",
        help="relay stdin/stdout to a run's SSH server (used as ssh's ProxyCommand)",
        description="Relay stdin and stdout through the server's tunnel to RUN's SSH server (or --port).",
    )
    t.add_argument("run", metavar="RUN", help="the run name")
    add_project_option(t)
    t.add_argument("--port", type=int, default=None, help="a port of the job instead of its SSH server")
    t.set_defaults(func=cmd_tunnel)


def cmd_tunnel(args: argparse.Namespace) -> int:
    from dstack.api.tunnel import TunnelError, bridge_stdio, open_tunnel
    from dstack.cli.common import fail, get_client

    client = get_client(args.project)
    try:
        ws = open_tunnel(client.api.base_url, client.api.token, client.project, args.run, args.port)
    except TunnelError as e:
        fail(str(e))
    refused = bridge_stdio(ws)
    if refused:
        fail(f"tunnel to {args.run} refused: {refused}")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    import signal
    import time

    from dstack.cli.attach import attach_dev_environment, stream_logs
    from dstack.cli.common import EXIT_ERROR, EXIT_OK, console, escape, fail, get_client

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)  # a SIGTERM detaches cleanly too (the run keeps running)
    client = get_client(args.project)
    run = client.runs.get(args.run)
    if run is None:
        fail(f"run {args.run!r} is not found in project {client.project!r}")
    try:
        if not run.attach():
            console().print(f"Run [bold]{escape(run.name)}[/] ended before it started ({run.status.value})")
            return EXIT_ERROR
        if run.run_spec.configuration.get("type") == "dev-environment":
            attach_dev_environment(run, client.project)
        for local, remote in sorted(run.ports.items()):
            console().print(f"Port {remote} of the job is at [bold]localhost:{local}[/]")
        if args.no_logs:
            while not run.refresh().status.is_finished():
                time.sleep(1)
        else:
            stream_logs(run)
    except KeyboardInterrupt:
        console().print(f"Detached from [bold]{escape(run.name)}[/]; it keeps running")
    finally:
        run.detach()
    return EXIT_OK
