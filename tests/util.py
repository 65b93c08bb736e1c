"""Test support every module shares: a free port, and waiting on state instead of sleeping."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

import psutil

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], T], timeout: float = 30, interval: float = 0.05, what: str = "condition") -> T:
    """Call `pred` until it returns something truthy, and return that; fail after `timeout` seconds.

    `pred` may raise to give up early (say, the process it waits for has exited).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    """Until something accepts connections on `port`."""
    wait_until(lambda: port_open(port, host), timeout, what=f"port {port} to open")


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (killed but not yet reaped by its parent)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(fetch: Callable[[], T], done: Callable[[T], bool], timeout: float, interval: float = 0.5) -> T:
    """Call `fetch` until `done` holds for its value, and return that value; the timeout's message
    shows the last value seen (what a fleet's instances or a run's status were), not just "timed out"."""
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s: {value}")
        time.sleep(interval)
