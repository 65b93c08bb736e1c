"""Metrics of image (container) jobs: the agent reads the container's cgroup (agent/cgroups.py).

The fast tests find the cgroup files from a fake /proc (cgroup v1, v2, a mount rooted below /).
The slow one runs a busy container job on a real server and agent with podman (tests/images.py;
skipped, saying why, without it): the job prints its busy process's own CPU time as it goes, and
the agent's samples, through the API and `dstack metrics`, are checked against that (about one
core on an idle host; this shared test host may give it less).
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from dstack.agent.cgroups import CgroupFiles, files_for
from tests.conftest import ServerProcess, running_server
from tests.metrics.test_job_metrics import _cli, _post, _wait_samples

V1_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "33 31 0:30 / {root}/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n"
    "35 31 0:32 / {root}/memory rw,relatime - cgroup cgroup rw,memory\n"
    "41 31 0:38 / {root}/unified rw,relatime - cgroup2 cgroup2 rw\n"
)


def _fake_proc(tmp_path: Path, cgroup: str, mountinfo: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "self").mkdir()
    (proc / "42" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    (proc / "self" / "cgroup").write_text("0::/agent\n")
    return proc


def test_cgroup_v1_files(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    path = "/libpod_parent/libpod-abc"
    (root / "cpuacct" / path[1:]).mkdir(parents=True)
    (root / "memory" / path[1:]).mkdir(parents=True)
    (root / "cpuacct" / path[1:] / "cpuacct.usage").write_text("2500000000\n")
    (root / "memory" / path[1:] / "memory.usage_in_bytes").write_text("10000\n")
    (root / "memory" / path[1:] / "memory.stat").write_text("cache 5\ntotal_inactive_file 4000\n")
    cgroup = f"4:memory:{path}\n2:cpuacct:{path}\n0::{path}\n"
    proc = _fake_proc(tmp_path, cgroup, V1_MOUNTS.format(root=root))
    files = files_for(42, proc)
    assert files is not None and not files.v2_cpu and not files.v2_memory
    assert files.read() == (2.5, 6000)  # seconds; memory without inactive file cache


def test_cgroup_v2_files_under_a_mount_rooted_below(tmp_path: Path) -> None:
    point = tmp_path / "unified"
    (point / "ctr").mkdir(parents=True)
    (point / "ctr" / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\n")
    (point / "ctr" / "memory.current").write_text("8192\n")
    (point / "ctr" / "memory.stat").write_text("anon 4096\ninactive_file 1024\n")
    mountinfo = f"41 31 0:38 /machine.slice {point} rw,relatime - cgroup2 cgroup2 rw\n"
    proc = _fake_proc(tmp_path, "0::/machine.slice/ctr\n", mountinfo)
    files = files_for(42, proc)
    assert files == CgroupFiles(point / "ctr" / "cpu.stat", point / "ctr" / "memory.current", True, True)
    assert files.read() == (1.5, 7168)
    (point / "ctr" / "cpu.stat").unlink()
    assert files.read() is None  # gone: the sampler looks the container up again
    assert files_for(7, proc) is None  # no such process
    (proc / "self" / "cgroup").write_text("0::/machine.slice/ctr\n")
    assert files_for(42, proc) is None  # the agent's own cgroup: the runtime made none for it


# A busy process in the background; every half second, the uptime and that process's CPU ticks.
BUSY = (
    "sh -c 'while :; do :; done' & B=$!; end=$(( $(cut -d. -f1 /proc/uptime) + 90 )); "
    "while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do "
    "echo cpu $(cut -d' ' -f1 /proc/uptime) $(cut -d' ' -f14,15 /proc/$B/stat); sleep 0.5; done; kill $B"
)


@pytest.fixture(scope="module")
def image() -> str:
    from tests.images import ensure_test_image

    return ensure_test_image()  # skips, saying why, without podman


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(
        tmp_path_factory.mktemp("image-metrics"),
        "sqlite",
        DSTACK_SERVER_METRICS_INTERVAL="1",
        DSTACK_AGENT_METRICS_INTERVAL="0.5",
    ) as srv:
        yield srv


def _job_cpu(srv: ServerProcess, run_name: str, since: float, until: float) -> float:
    """The busy process's own CPU use between two wall-clock times, in percent of one core."""
    with open("/proc/uptime") as f:  # the container's /proc/uptime is the host's
        offset = time.time() - float(f.read().split()[0])
    ticks = os.sysconf("SC_CLK_TCK")
    r = _post(srv, "/api/project/main/logs/poll", {"run_name": run_name, "limit": 1000})
    text = b"".join(base64.b64decode(e["message"]) for e in r.json()["logs"]).decode()
    rows = [line.split() for line in text.splitlines()]
    lines = [(float(p[1]) + offset, int(p[2]) + int(p[3])) for p in rows if len(p) == 4 and p[0] == "cpu"]
    lines = [(t, c) for t, c in lines if since <= t <= until]
    assert len(lines) >= 3, lines
    return (lines[-1][1] - lines[0][1]) / ticks / (lines[-1][0] - lines[0][0]) * 100


def test_busy_container_job_reads_about_one_core(server: ServerProcess, image: str) -> None:
    run_name = f"busyimg-{uuid.uuid4().hex[:6]}"
    conf = {
        "type": "task",
        "name": run_name,
        "image": image,
        "commands": [BUSY],
        "resources": {"cpu": "1..", "memory": "0.5GB..", "disk": "1GB.."},
    }
    r = _post(server, "/api/project/main/runs/submit", {"run_spec": {"configuration": conf}})
    assert r.status_code == 200, r.text
    try:
        series = _wait_samples(server, run_name)
        cpu = series["cpu_usage_percent"]
        assert series["memory_usage_bytes"]["values"][0] > 0

        stamps = [datetime.fromisoformat(t).timestamp() for t in cpu["timestamps"]][:-1]  # skip the oldest
        job_percent = _job_cpu(server, run_name, min(stamps), max(stamps))
        reported = sum(cpu["values"][:-1]) / len(cpu["values"][:-1])
        # the container's cgroup also counts the job's shell and its `cut`s: a little above its busy process
        low = max(job_percent - 12, 0.6 * job_percent - 3)
        assert low <= reported <= job_percent + max(15.0, 0.25 * job_percent), (reported, job_percent)
        # it did get CPU (this shared host may give it far less than a core), so a reading of zero fails
        assert job_percent > 4, f"the host gave the job too little CPU to compare: {job_percent:.1f} %"
        assert reported <= 130  # one busy process cannot use more than one core

        out = _cli(server, "metrics", run_name)
        assert out.returncode == 0, out.stderr
        row = next(ln for ln in out.stdout.splitlines() if ln.startswith("replica=0 job=0"))
        shown = float(row.split()[3].rstrip("%"))
        assert 0 < shown <= 150, row
    finally:
        _post(server, "/api/project/main/runs/stop", {"runs_names": [run_name], "abort": True})
