"""`dstack` console script: parses arguments and maps errors to stable exit codes."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dstack.cli.commands import COMMANDS
from dstack.cli.common import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, CLIExit

EPILOG = """\
exit codes:
  0    success (for run/apply: the run finished DONE, or was detached)
  1    error, or the run ended FAILED / TERMINATED
  2    usage error (bad arguments)
  130  interrupted (Ctrl-C), and the run was stopped if asked to
"""


def build_parser() -> argparse.ArgumentParser:
    from dstack.version import __version__

    parser = argparse.ArgumentParser(
        prog="dstack",
        description="dstack: run tasks, services and serverless endpoints on your own compute.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--version", action="version", version=f"dstack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        sys.exit(EXIT_USAGE)
    sys.exit(_dispatch(func, args))


def _dispatch(func, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from dstack.cli.common import error, server_url
    from dstack.core.errors import ClientError, ConfigurationError, DstackError, ServerClientError

    try:
        code = func(args)
        return int(code or 0)
    except CLIExit as e:
        return e.code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ConfigurationError as e:
        error(str(e))
        return EXIT_ERROR
    except ClientError as e:
        url = server_url(getattr(args, "project", None))
        error(f"cannot reach the dstack server at {url} — start it with 'dstack server'")
        detail = str(e)
        if detail:
            from dstack.cli.common import err_console, escape

            err_console().print(f"[dim]{escape(detail)}[/]")
        return EXIT_ERROR
    except ServerClientError as e:
        error(str(e))
        return EXIT_ERROR
    except DstackError as e:
        error(str(e) or type(e).__name__)
        return EXIT_ERROR
    except BrokenPipeError:
        return EXIT_ERROR


if __name__ == "__main__":
    main()
