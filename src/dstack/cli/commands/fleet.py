"""`dstack fleet [list]`, `dstack fleet delete NAME [-i N]`, and `dstack apply -f fleet.dstack.yml`
(`apply_fleet`): SSH fleets through `client.fleets`.

Applying shows the plan (each host with what it offers, probed over SSH), asks, applies, and
waits until every host is `idle` (its agent deployed) or `unreachable` (with the reason).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from dstack.cli.common import add_project_option

WAIT_SECONDS = 600


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fleet", help="manage fleets", description="List and delete fleets (apply creates them).")
    add_project_option(p)
    fsub = p.add_subparsers(dest="fleet_command", metavar="SUBCOMMAND")
    p.set_defaults(func=cmd_list)

    ls = fsub.add_parser("list", help="list fleets and their instances")
    add_project_option(ls, subcommand=True)
    ls.set_defaults(func=cmd_list)

    d = fsub.add_parser("delete", help="delete a fleet, or some of its instances (-i)")
    d.add_argument("name", metavar="NAME")
    d.add_argument(
        "-i",
        "--instance",
        dest="instances",
        type=int,
        action="append",
        metavar="N",
        help="only instance N (repeatable)",
    )
    d.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    add_project_option(d, subcommand=True)
    d.set_defaults(func=cmd_delete)


def is_fleet_file(path: str) -> bool:
    """Whether the file says `type: fleet` (anything unreadable is left to the run loader's errors)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("type") == "fleet"


def _gb(mib: Any) -> str:
    try:
        return f"{int(mib) / 1024:.0f}GB"
    except (TypeError, ValueError):
        return "-"


def _gpus(gpus: list[dict[str, Any]] | None) -> str:
    if not gpus:
        return "-"
    names: dict[str, int] = {}
    for g in gpus:
        key = f"{g.get('name', '?')}:{_gb(g.get('memory_mib'))}"
        names[key] = names.get(key, 0) + 1
    return ", ".join(f"{k}:{n}" for k, n in names.items())


def print_fleet_plan(plan: dict[str, Any]) -> None:
    from rich.table import Table

    from dstack.cli.common import console, escape

    out = console()
    out.print(f" [bold]Fleet[/]   {escape(plan.get('name') or '(a new name)')}   ({escape(plan.get('action'))})")
    out.print(f" [bold]Placement[/]   {escape(plan.get('placement', 'any'))}\n")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("#", "HOST", "ACTION", "CPUS", "MEMORY", "DISK", "GPUS", "PYTHON", "ERROR"):
        table.add_column(col)
    for i, h in enumerate(plan.get("hosts", [])):
        probe = h.get("probe") or {}
        res = h.get("resources") or probe
        table.add_row(
            str(i),
            escape(f"{h.get('user')}@{h.get('hostname')}:{h.get('port')}"),
            escape(h.get("action", "")),
            escape(str(res.get("cpus", "-"))),
            _gb(res.get("memory_mib")),
            _gb(res.get("disk_mib")),
            escape(_gpus(res.get("gpus"))),
            escape(", ".join(probe.get("pythons") or []) or "-"),
            f"[red]{escape(h['error'])}[/]" if h.get("error") else "",
        )
    out.print(table)
    out.print()


def print_fleets(fleets: list[Any]) -> None:
    from rich.table import Table

    from dstack.cli.common import console, escape, styled_status

    out = console()
    if not fleets:
        out.print("No fleets.")
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("FLEET", "INSTANCE", "BACKEND", "HOST", "RESOURCES", "PRICE", "STATUS", "RUNNING"):
        table.add_column(col)
    for f in fleets:
        if not f.instances:
            table.add_row(escape(f.name), "-", "-", "-", "-", "-", "no instances", "")
        for n, i in enumerate(f.instances):
            status = styled_status(i.status)
            if i.status_message:
                status += f" [dim]({escape(i.status_message[:120])})[/]"
            table.add_row(
                escape(f.name) if n == 0 else "",
                str(i.instance_num),
                escape(f"{i.backend} ({i.region})"),
                escape(i.hostname),
                escape(i.resources_pretty or "-"),
                "$0" if not i.price else f"${i.price:g}",
                status,
                escape(", ".join(i.jobs) or ""),
            )
    out.print(table)


def apply_fleet(args: argparse.Namespace, path: str) -> int:
    import sys

    from dstack.cli.common import EXIT_ERROR, ask_yes_no, console, error, fail, get_client
    from dstack.core.models.fleets import FleetConfiguration
    from dstack.core.yaml_loader import load_configuration

    conf = load_configuration(path)
    assert isinstance(conf, FleetConfiguration)
    client = get_client(args.project)
    out = console()
    with out.status("Probing the hosts over SSH...") if out.is_terminal else _Null():
        plan = client.fleets.get_plan(conf)
    print_fleet_plan(plan)
    failed = [h for h in plan.get("hosts", []) if h.get("error")]
    if failed:
        error("some hosts cannot join the fleet (see ERROR above)")
        return EXIT_ERROR
    if not args.yes:
        if not sys.stdin.isatty():
            fail("not confirmed: stdin is not a terminal; pass -y to apply without asking")
        if not ask_yes_no(f"{'Update' if plan.get('action') == 'update' else 'Create'} the fleet?"):
            out.print("Cancelled.")
            return EXIT_ERROR
    fleet = client.fleets.apply(conf)
    if getattr(args, "detach", False):
        out.print(f"[green]OK[/] fleet [bold]{fleet.name}[/] applied; 'dstack fleet' shows its hosts coming up")
        return 0
    deadline = time.monotonic() + WAIT_SECONDS
    with out.status("Deploying agents...") if out.is_terminal else _Null():
        while time.monotonic() < deadline:
            fleet = client.fleets.get(fleet.name)
            if all(i.status not in ("provisioning", "pending") for i in fleet.instances):
                break
            time.sleep(0.2)  # a host comes up in ~2 s: a 1 s poll added up to a second
    print_fleets([fleet])
    bad = [i for i in fleet.instances if i.status not in ("idle", "busy")]
    if bad:
        error(f"{len(bad)} of {len(fleet.instances)} hosts are not ready")
        return EXIT_ERROR
    out.print(f"[green]OK[/] fleet [bold]{fleet.name}[/] is ready")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from dstack.cli.common import get_client

    print_fleets(get_client(args.project).fleets.list())
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    import sys

    from dstack.cli.common import EXIT_ERROR, ask_yes_no, console, escape, fail, get_client

    client = get_client(args.project)
    what = f"instance(s) {', '.join(map(str, args.instances))} of fleet {args.name}" if args.instances else args.name
    if not args.yes:
        if not sys.stdin.isatty():
            fail("not confirmed: stdin is not a terminal; pass -y to delete without asking")
        if not ask_yes_no(f"Delete {what}?"):
            console().print("Cancelled.")
            return EXIT_ERROR
    if args.instances:
        client.fleets.delete_instances(args.name, args.instances)
    else:
        client.fleets.delete(args.name)
    console().print(f"[green]OK[/] deleted {escape(what)}")
    return 0


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
