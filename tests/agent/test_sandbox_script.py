"""The root half of the job wrapper (agent.sandbox): which directories are covered and what comes back.

Pure string checks (no root needed); tests/agent/test_isolation.py runs the wrapper for real."""

from __future__ import annotations

import os
from pathlib import Path

from dstack.agent.sandbox import JobUser, _sandbox_script

TOOLS = {
    "unshare": "/usr/bin/unshare",
    "setpriv": "/usr/bin/setpriv",
    "mount": "/usr/bin/mount",
    "mkdir": "/usr/bin/mkdir",
}
USER = JobUser(200123, 200123, Path("/nonexistent"))


def tmpfs_targets(script: str) -> list[str]:
    return [line.rsplit(" ", 1)[1] for line in script.splitlines() if "dstack-hidden" in line]


def test_a_covered_directory_inside_another_is_not_mounted_again(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    agent = closed / "dstack-home" / "server" / "agent"
    (agent / "jobs").mkdir(parents=True)
    os.chmod(closed, 0o700)
    script = _sandbox_script(TOOLS, USER, [agent / "jobs"], [closed / "dstack-home", agent])
    # the outermost closed directory on the way is covered once; the homes under it stay covered by it
    # (mounting over them would fail: they do not exist in the empty tmpfs)
    covered = tmpfs_targets(script)
    assert str(closed) in covered or any(Path(c) in closed.parents for c in covered)
    assert str(agent) not in covered and str(closed / "dstack-home") not in covered
    assert "--rbind /run/dstack-agent/sandbox/" in script and script.rstrip().endswith('-- "$@"')
    assert f"--reuid={USER.uid} --regid={USER.gid} --clear-groups" in script and "--no-new-privs" in script


def test_a_covered_directory_inside_an_exposure_is_covered_after_it(tmp_path: Path) -> None:
    exposed = tmp_path / "open"
    secret = exposed / "agent-home"
    secret.mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    script = _sandbox_script(TOOLS, USER, [exposed], [secret], private_proc=False)
    assert str(secret) in tmpfs_targets(script)
    assert "hidepid" not in script


def test_proc_is_private_by_default(tmp_path: Path) -> None:
    assert "hidepid=2 proc /proc" in _sandbox_script(TOOLS, USER, [], [])
