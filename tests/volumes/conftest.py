"""Volumes' filesystem images are loop-mounted on the host: unmount those of each test's servers
when the test ends, so no mount (or loop device) outlives the temporary directories."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def unmount_under(root: Path) -> None:
    prefix = str(root.resolve()) + "/"
    with open("/proc/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], capture_output=True, timeout=60)


@pytest.fixture(autouse=True)
def _unmount_volumes(request: pytest.FixtureRequest) -> Iterator[None]:
    roots = []  # read now: by teardown, tmp_path is gone
    if "server" in request.fixturenames:
        roots.append(request.getfixturevalue("server").home)
    if "tmp_path" in request.fixturenames:
        roots.append(request.getfixturevalue("tmp_path"))
    yield
    for root in roots:
        unmount_under(root)
