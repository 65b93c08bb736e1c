"""Follow a submitted run: progress until it starts, its logs, Ctrl-C handling, the exit code."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from dstack.cli.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ask_yes_no,
    console,
    err_console,
    escape,
    status_value,
    styled_status,
)
from dstack.cli.views import run_error

POLL_SECONDS = 0.5
FINISH_WAIT_SECONDS = 60.0
SSH_READY_SECONDS = 1800.0  # how long a dev environment's `init` may take before its link is printed anyway


def _refresh(run: Any) -> str:
    run.refresh()
    return status_value(run.status)


def _is_finished(run: Any) -> bool:
    status = run.status
    fn = getattr(status, "is_finished", None)
    if callable(fn):
        return bool(fn())
    return status_value(status) in ("done", "failed", "terminated")


def wait_until(run: Any, done: Callable[[Any], bool], label: str, timeout: float | None = None) -> bool:
    """Poll `run` until `done(run)`, showing `<label> <run> (<status>)`; False on timeout.

    On a terminal the line is a spinner; piped, each status change is printed once.
    """
    out = console()
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None

    def text() -> str:
        return f"{label} [bold]{escape(run.name)}[/] ({styled_status(run.status)})"

    if out.is_terminal:
        with out.status(text()) as spinner:
            while not done(run):
                if deadline is not None and time.monotonic() > deadline:
                    return False
                time.sleep(POLL_SECONDS)
                _refresh(run)
                spinner.update(text())
        return True
    while True:
        status = status_value(run.status)
        if status != last:
            out.print(text())
            last = status
        if done(run):
            return True
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
        _refresh(run)


def _started(run: Any) -> bool:
    return status_value(run.status) == "running" or _is_finished(run)


def stream_logs(run: Any, replica_num: int = 0, job_num: int = 0, follow: bool = True, **extra: Any) -> None:
    """Copy the job's log bytes to stdout as they arrive."""
    out = sys.stdout.buffer
    sys.stdout.flush()
    for chunk in run.logs(replica_num=replica_num, job_num=job_num, follow=follow, **extra):
        if chunk:
            out.write(chunk)
            out.flush()


def print_endpoints(run: Any, configuration_type: str) -> None:
    out = console()
    if configuration_type == "service":
        url = getattr(run, "service_url", None)
        if url:
            out.print(f"Service is published at [bold]{escape(url)}[/]")
    elif configuration_type == "serverless":
        endpoint_id = getattr(run, "endpoint_id", None) or run.name
        url = getattr(run, "endpoint_url", None)
        if url is None:
            extra = getattr(run, "extra", None) or getattr(getattr(run, "_run", None), "extra", None) or {}
            url = extra.get("endpoint_url") or extra.get("url")
        out.print(
            f"Endpoint [bold]{escape(endpoint_id)}[/] is published" + (f" at [bold]{escape(url)}[/]" if url else "")
        )


def attach_dev_environment(run: Any, project: str) -> None:
    """Write the run's `Host` entry (api/ssh.py) and say how to connect: `ssh RUN`, and the IDE's link
    to the job's working directory (asked of the dev environment itself over that entry)."""
    import subprocess

    from dstack.api.ssh import write_host

    config = write_host(run.name, project)
    out = console()
    ide = run.run_spec.configuration.get("ide") or "vscode"
    pwd = ""
    deadline = time.monotonic() + SSH_READY_SECONDS
    # `init` runs before the SSH server starts: wait until it answers (or the run ends)
    while time.monotonic() < deadline:
        try:
            done = subprocess.run(
                ["ssh", "-F", str(config), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", run.name, "pwd"],
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired):
            break
        if done.returncode == 0:
            pwd = done.stdout.strip()
            break
        if _is_finished(run.refresh()):
            return
        time.sleep(POLL_SECONDS * 2)
    out.print(f"To open an SSH session, run: [bold]ssh {escape(run.name)}[/]")
    out.print(
        f"To open it in {'Cursor' if ide == 'cursor' else 'VS Code'}, use: "
        f"[bold]{escape(ide)}://vscode-remote/ssh-remote+{escape(run.name)}{escape(pwd if pwd.startswith('/') else '')}[/]"
    )


def final_status(run: Any) -> int:
    """Print how the run ended and return the exit code: 0 for DONE, 1 otherwise."""
    out = console()
    status = status_value(run.status)
    if status == "done":
        out.print(f"Run [bold]{escape(run.name)}[/] is {styled_status(run.status)}")
        return EXIT_OK
    error = run_error(run)
    verb = "[bold red]failed[/]" if status == "failed" else f"is {styled_status(run.status)}"
    out.print(f"Run [bold]{escape(run.name)}[/] {verb}" + (f": [red]{escape(error)}[/]" if error else ""))
    return EXIT_ERROR


def on_interrupt(run: Any) -> int:
    """Ctrl-C while attached: stop the run (exit 130) or detach and leave it running (exit 0)."""
    err_console().print()
    try:
        stop = ask_yes_no("Stop the run before detaching?")
    except KeyboardInterrupt:
        stop = False
    if not stop:
        _detach(run)
        console().print(
            f"Detached from [bold]{escape(run.name)}[/]; it keeps running. Follow it with 'dstack logs -f {escape(run.name)}'"
        )
        return EXIT_OK
    run.stop(abort=False)
    try:
        wait_until(run, _is_finished, "Stopping", timeout=FINISH_WAIT_SECONDS)
    except KeyboardInterrupt:
        run.stop(abort=True)
        wait_until(run, _is_finished, "Aborting", timeout=FINISH_WAIT_SECONDS)
    console().print(f"Run [bold]{escape(run.name)}[/] is {styled_status(run.status)}")
    return EXIT_INTERRUPTED


def _detach(run: Any) -> None:
    try:
        run.detach()
    except Exception:
        pass


def follow_run(run: Any, configuration_type: str, detach: bool) -> int:
    """After submission: wait for the run to start, print endpoints, stream logs, report the end."""
    if detach:
        console().print(
            f"Run [bold]{escape(run.name)}[/] is submitted. Follow it with 'dstack logs -f {escape(run.name)}'"
        )
        print_endpoints(run, configuration_type)  # known at submission; printed even when detached
        return EXIT_OK
    try:
        if configuration_type == "serverless":
            print_endpoints(run, configuration_type)
            console().print(f"Stop it with 'dstack stop {escape(run.name)}'")
            return EXIT_OK
        wait_until(run, _started, "Launching")
        print_endpoints(run, configuration_type)
        try:
            if not _is_finished(run):
                run.attach()
                if configuration_type == "dev-environment":
                    attach_dev_environment(run, run._client.project)
        except Exception as e:  # port forwarding is a convenience: never fail the run over it
            err_console().print(f"[yellow]Warning:[/] cannot attach to {escape(run.name)}: {escape(e)}")
        stream_logs(run)
        if not _is_finished(run):
            _refresh(run)
        if not _is_finished(run):
            wait_until(run, _is_finished, "Finishing", timeout=FINISH_WAIT_SECONDS)
    except KeyboardInterrupt:
        return on_interrupt(run)
    _detach(run)
    return final_status(run)
