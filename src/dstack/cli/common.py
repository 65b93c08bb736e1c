"""Helpers shared by CLI commands: consoles, prompts, errors, the client, formatting.

Everything heavy (rich, the API client) is imported inside functions so that `dstack --help`
and `dstack ps` start quickly.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from rich.console import Console

    from dstack.api import Client

# Exit codes scripts can rely on.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_consoles: dict[str, Console] = {}


class CLIExit(Exception):
    """Raised to end a command with an exit code after its message was printed."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _make_console(stderr: bool) -> Console:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output keeps whole table rows on one line so scripts can grep them.
    width = None if stream.isatty() else int(os.environ.get("COLUMNS") or 200)
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def console() -> Console:
    if "out" not in _consoles:
        _consoles["out"] = _make_console(False)
    return _consoles["out"]


def err_console() -> Console:
    if "err" not in _consoles:
        _consoles["err"] = _make_console(True)
    return _consoles["err"]


def error(message: str) -> None:
    """Print `Error: <message>` in red on stderr (markup in `message` is not interpreted)."""
    from rich.text import Text

    err_console().print(Text("Error: " + message, style="red"))


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    error(message)
    raise CLIExit(code)


def ask_yes_no(question: str, *, default_when_no_tty: bool | None = None) -> bool:
    """Ask `question [y/n]` on the terminal; without a terminal answer `default_when_no_tty`.

    Reading a pipe works too (tests and `yes |` feed answers); end of input counts as no.
    `default_when_no_tty=None` means: read stdin even when it is not a terminal.
    """
    if default_when_no_tty is not None and not sys.stdin.isatty():
        return default_when_no_tty
    out = err_console() if not sys.stdout.isatty() else console()
    while True:
        out.print(f"{question} [y/n]: ", end="", markup=False, highlight=False)
        out.file.flush()
        line = sys.stdin.readline()
        if not sys.stdin.isatty():
            out.print(line.strip(), markup=False)  # a piped answer is not echoed by a terminal
        if not line:
            return False
        answer = line.strip().lower()
        if answer in ("y", "yes"):
            return True
        if answer in ("n", "no"):
            return False


PROJECT_HELP = "the project (default: the default project in ~/.dstack/config.yml)"


def add_project_option(parser: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    """`--project`, the same everywhere. On a subcommand it defaults to "not given", so
    `dstack fleet --project p list` keeps the value given before the subcommand."""
    extra: dict[str, Any] = {"default": argparse.SUPPRESS} if subcommand else {}
    parser.add_argument("--project", help=PROJECT_HELP, **extra)


def get_client(project: str | None) -> Client:
    """The API client for `project` (or the default), failing with a helpful message."""
    from dstack.api import Client
    from dstack.api.config import ConfigError, get_project

    try:
        cfg = get_project(project)
    except ConfigError as e:
        fail(str(e))
    if cfg is None:
        wanted = project or os.environ.get("DSTACK_PROJECT")
        if wanted:
            fail(
                f"project {wanted!r} is not configured; add it with 'dstack config --url URL --project {wanted} --token TOKEN'"
            )
        fail(
            "no project is configured; start a server with 'dstack server' or run 'dstack config --url URL --project NAME --token TOKEN'"
        )
    return Client.from_config(project_name=project)


def server_url(project: str | None) -> str:
    """The server URL the client would use, for error messages; `?` when unknown."""
    try:
        from dstack.api.config import get_project

        cfg = get_project(project)
        return cfg.url if cfg else "?"
    except Exception:
        return "?"


# --- formatting ------------------------------------------------------------------------------

STATUS_STYLES = {
    "pending": "yellow",
    "submitted": "grey62",
    "provisioning": "cyan",
    "pulling": "cyan",
    "running": "bold green",
    "terminating": "yellow",
    "terminated": "grey62",
    "aborted": "red",
    "failed": "bold red",
    "done": "grey62",
}


def status_value(status: Any) -> str:
    return str(getattr(status, "value", status) or "")


def styled_status(status: Any) -> str:
    value = status_value(status)
    style = STATUS_STYLES.get(value, "")
    return f"[{style}]{value}[/]" if style else value


def format_price(price: float | None) -> str:
    if price is None:
        return "-"
    return f"${price:.4f}".rstrip("0").rstrip(".") if price else "$0"


def format_ago(when: datetime | None, now: datetime | None = None) -> str:
    """`now`, `12 secs ago`, `3 mins ago`, `2 hours ago`, `yesterday`, then a date."""
    if when is None:
        return "-"
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    secs = int((now - when).total_seconds())
    if secs < 5:
        return "now"
    if secs < 60:
        return f"{secs} secs ago"
    if secs < 3600:
        mins = secs // 60
        return f"{mins} min{'s' if mins != 1 else ''} ago"
    if secs < 86400:
        hours = secs // 3600
        return f"{hours} hour{'s' if hours != 1 else ''} ago"
    if secs < 2 * 86400:
        return "yesterday"
    return when.astimezone().strftime("%b %d, %Y")


def resources_text(resources: Any) -> str:
    """Offer / instance resources as one line, whatever shape the API gives them."""
    if resources is None:
        return "-"
    for method in ("pretty", "pretty_format"):
        fn = getattr(resources, method, None)
        if callable(fn):
            return str(fn())
    return str(resources)


def escape(text: Any) -> str:
    from rich.markup import escape as _escape

    return _escape(str(text))


# --- fast plain tables -----------------------------------------------------------------------

Cell = tuple[str, str]  # (text, style); style is a space-separated subset of _SGR's keys

_SGR = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "cyan": "36",
    "grey62": "90",
}


def use_color(stream: Any = None) -> bool:
    stream = stream or sys.stdout
    return stream.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def _paint(text: str, style: str, color: bool) -> str:
    if not color or not style or not text:
        return text
    codes = ";".join(_SGR[s] for s in style.split() if s in _SGR)
    return f"\x1b[{codes}m{text}\x1b[0m" if codes else text


def _is_note(row: list[Cell]) -> bool:
    return len(row) > 1 and all(not text for text, _ in row[1:]) and row[0][0].startswith("  ")


def render_table(columns: list[str], rows: list[list[Cell]], color: bool) -> str:
    """Left-aligned columns two spaces apart, a bold header; linear in the number of cells.

    rich's Table measures every cell through its layout engine, which costs seconds for a
    thousand rows; `ps` needs this to stay instant.
    """
    widths = [len(c) for c in columns]
    for row in rows:
        if _is_note(row):
            continue  # a full-width line under a row (a URL) doesn't size the columns
        for i, (text, _) in enumerate(row):
            if len(text) > widths[i]:
                widths[i] = len(text)
    last = len(columns) - 1
    lines = ["  ".join(_paint(c.ljust(widths[i]) if i < last else c, "bold", color) for i, c in enumerate(columns))]
    for row in rows:
        if _is_note(row):
            lines.append(_paint(row[0][0], row[0][1], color))
            continue
        parts = []
        for i, (text, style) in enumerate(row):
            pad = "" if i == last else " " * (widths[i] - len(text))
            parts.append(_paint(text, style, color) + pad)
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
