"""`dstack volume [list] | delete NAME...`, and `dstack apply -f vol.dstack.yml` for `type: volume`.

A volume keeps data from one run to the next: runs mount it with `volumes: [NAME:/path]`.
"""

from __future__ import annotations

import argparse

from dstack.cli.common import add_project_option


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "volume",
        help="manage the project's volumes",
        description="List and delete the project's volumes. Create one with `dstack apply -f` a "
        "`type: volume` configuration; runs mount it with `volumes: [NAME:/path]`.",
    )
    add_project_option(p)
    p.set_defaults(func=cmd_list)
    vsub = p.add_subparsers(dest="volume_command", metavar="SUBCOMMAND")

    ls = vsub.add_parser("list", help="list volumes")
    add_project_option(ls, subcommand=True)
    ls.set_defaults(func=cmd_list)

    d = vsub.add_parser("delete", help="delete volumes and their data")
    d.add_argument("names", nargs="+", metavar="NAME")
    d.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    add_project_option(d, subcommand=True)
    d.set_defaults(func=cmd_delete)


def is_volume_file(path: str) -> bool:
    """Whether the file says `type: volume` (anything unreadable is left to the run loader's errors)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and data.get("type") == "volume"


def _size(size_gb: float | None, enforced: bool = True) -> str:
    if size_gb is None:
        return "-"
    return f"{size_gb:g}GB" + ("" if enforced else " (not enforced)")


def cmd_list(args: argparse.Namespace) -> int:
    from dstack.cli.common import console, get_client, render_table, use_color

    volumes = get_client(args.project).volumes.list()
    if not volumes:
        console().print("No volumes. Create one with 'dstack apply -f' a 'type: volume' configuration.")
        return 0
    rows = [
        [
            (v.name, "bold"),
            (v.backend, ""),
            (v.region, ""),
            (v.availability_zone or "-", ""),
            (_size(v.size_gb, v.size_enforced), ""),
            ("shared" if v.shared else "-", ""),
            (", ".join(v.attached_to) or "-", ""),
            (v.created_at[:19].replace("T", " "), "grey62"),
        ]
        for v in volumes
    ]
    print(
        render_table(
            ["NAME", "BACKEND", "REGION", "HOST", "SIZE", "SHARED", "ATTACHED TO", "CREATED"], rows, use_color()
        )
    )
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    import sys

    from dstack.cli.common import EXIT_ERROR, ask_yes_no, console, escape, fail, get_client

    client = get_client(args.project)
    if not args.yes:
        if not sys.stdin.isatty():
            fail("not confirmed: stdin is not a terminal; pass -y to delete without asking")
        if not ask_yes_no(
            f"Delete the volume{'s' if len(args.names) > 1 else ''} {', '.join(args.names)} and its data?"
        ):
            console().print("Cancelled.")
            return EXIT_ERROR
    client.volumes.delete(args.names)
    console().print(f"[green]OK[/] deleted {escape(', '.join(args.names))}")
    return 0


def apply_volume(args: argparse.Namespace, path: str) -> int:
    """`dstack apply -f` of a `type: volume` file: create it (again unchanged: nothing to do)."""
    from dstack.cli.common import console, escape, get_client
    from dstack.core.models.volumes import VolumeConfiguration
    from dstack.core.yaml_loader import load_configuration

    conf = load_configuration(path)
    assert isinstance(conf, VolumeConfiguration)
    volume = get_client(args.project).volumes.create(conf)
    size = f", {_size(volume.size_gb, volume.size_enforced)}" if volume.size_gb is not None else ""
    where = volume.backend
    if volume.availability_zone:  # a fleet host's volume: say which host keeps it
        where += f", fleet {volume.region}, host {volume.availability_zone}"
    console().print(f"[green]OK[/] volume [bold]{escape(volume.name)}[/] ready ({escape(where)}{size})")
    return 0
