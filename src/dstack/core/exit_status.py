"""What a process's exit status means, in the words `dstack ps`, logs and errors use.

Shells and the agent report a process killed by signal N as exit status 128 + N (139 is SIGSEGV),
so one number carries both cases; this module is the one place that reads it.
"""

from __future__ import annotations

import signal


def signal_name(exit_status: int | None) -> str | None:
    """`SIGSEGV` for 139 (128 + 11), None when the status is not a signal's."""
    if exit_status is None or not 128 < exit_status < 128 + 65:
        return None
    try:
        return signal.Signals(exit_status - 128).name
    except ValueError:
        return None


def describe_exit(exit_status: int) -> str:
    """`killed by SIGSEGV (exit status 139)` or `exited with status 3`."""
    sig = signal_name(exit_status)
    if sig is not None:
        return f"killed by {sig} (exit status {exit_status})"
    return f"exited with status {exit_status}"


def describe_engine_exit(exit_status: int) -> str:
    """For inference engines, whose deaths users read about in `dstack ps` and proxy errors."""
    sig = signal_name(exit_status)
    return f"engine crashed: {sig}" if sig else f"engine exited with status {exit_status}"


def exit_error(exit_status: int, message: str | None) -> str:
    """A failed job's error in one line: the agent's or engine's words for a crash, else `exit status 3`."""
    if signal_name(exit_status) or (message or "").startswith("engine "):
        return message or describe_exit(exit_status)
    return f"exit status {exit_status}"
