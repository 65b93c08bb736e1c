"""HostCapability (dstack.agent.capability): probed once, switched off by its variable, says why."""

from __future__ import annotations

import sys

import pytest

from dstack.agent.capability import HostCapability, find_tool


class _Probe(HostCapability):
    disable_env = "DSTACK_TEST_NO_PROBE"
    what = "test capability"

    def __init__(self, answer: str) -> None:
        super().__init__()
        self.answer, self.tries, self.prepared = answer, 0, 0

    def _try(self) -> str:
        self.tries += 1
        return self.answer

    def _on_available(self) -> None:
        self.prepared += 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preconditions include Linux")
def test_probed_once_and_prepared_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSTACK_TEST_NO_PROBE", raising=False)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    works = _Probe("")
    assert works.reason == "not probed yet"
    assert works.available and works.available and works.probe()
    assert (works.tries, works.prepared, works.reason) == (1, 1, "")
    broken = _Probe("no tool here")
    assert not broken.available and not broken.probe()
    assert (broken.tries, broken.prepared, broken.reason) == (1, 0, "no tool here")


def test_preconditions_come_before_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSTACK_TEST_NO_PROBE", "1")
    off = _Probe("")
    assert not off.available and off.reason == "disabled by DSTACK_TEST_NO_PROBE" and off.tries == 0
    monkeypatch.delenv("DSTACK_TEST_NO_PROBE")
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setattr(sys, "platform", "linux")
    user = _Probe("")
    assert not user.available and user.reason == "the agent does not run as root" and user.tries == 0


def test_find_tool_looks_in_the_system_directories(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_tool("sh") in ("/usr/sbin/sh", "/sbin/sh", "/usr/bin/sh", "/bin/sh")
    assert find_tool("surely-no-such-tool-here") is None
