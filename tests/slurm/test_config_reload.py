"""config.yml edits reach a running server: a Slurm backend added after the start is offered, a
bad edit is logged with file, line and field while the previous configuration stays, and SIGHUP
re-reads the file even when its size and mtime look unchanged (and does not stop the server)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from dstack.api import Resources, Task
from tests.conftest import TEST_SERVER_ENV, make_server
from tests.slurm.cluster import PARTITION, SlurmCluster

TASK = Task(commands=["true"], backends=["slurm"], resources=Resources(cpu=1, memory="1GB", disk="1GB.."))


def _config(partition: str, shared: Path) -> str:
    return (
        "projects:\n"
        "  - name: main\n"
        "    backends:\n"
        "      - type: slurm\n"
        f"        partitions: [{partition}]\n"
        f"        shared_dir: {shared}\n"
    )


def _slurm_regions(client) -> set[str]:  # type: ignore[no-untyped-def]
    offers = client.runs.get_plan(TASK).job_plans[0].offers
    return {o.region for o in offers if o.backend == "slurm"}


def _wait_regions(client, want: set[str], timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    seen: set[str] = set()
    while time.time() < deadline:
        seen = _slurm_regions(client)
        if seen == want:
            return
        time.sleep(0.3)
    raise AssertionError(f"slurm offers in {seen}, expected {want}")


def test_config_edits_apply_without_a_restart(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    srv = make_server(tmp_path, **TEST_SERVER_ENV, SLURM_CONF=str(slurm_cluster.conf))
    config = srv.home / "server" / "config.yml"
    config.parent.mkdir(parents=True, exist_ok=True)
    srv.start()  # no config.yml: no Slurm backend
    try:
        client = srv.client()
        assert _slurm_regions(client) == set()
        config.write_text(_config(PARTITION, tmp_path / "shared"))
        _wait_regions(client, {PARTITION})  # added while running

        good = config.read_text()
        config.write_text(good.replace(f"partitions: [{PARTITION}]", f"partitions: {PARTITION}"))
        deadline = time.time() + 20
        while time.time() < deadline and "not applied" not in srv.logs(100_000):
            time.sleep(0.2)
        logs = srv.logs(100_000)
        assert f"{config}:5:" in logs and "projects[0].backends[0].partitions" in logs, logs[-3000:]
        assert _slurm_regions(client) == {PARTITION}  # the previous configuration stays

        applied = srv.logs(100_000).count("configuration applied")
        good = _config(PARTITION, tmp_path / "shared2")
        config.write_text(good)
        deadline = time.time() + 20
        while time.time() < deadline and srv.logs(100_000).count("configuration applied") == applied:
            time.sleep(0.2)
        assert srv.logs(100_000).count("configuration applied") == applied + 1
        stamp = config.stat()
        # Same size and mtime (written aside, then moved in at once): only SIGHUP makes the
        # server read it again.
        edited = config.with_name("config.yml.new")
        edited.write_text(good.replace(f"[{PARTITION}]", "[" + "x" * len(PARTITION) + "]"))
        os.utime(edited, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        os.replace(edited, config)
        time.sleep(2.5)  # a few passes of the file watch, which sees no change
        assert _slurm_regions(client) == {PARTITION}
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGHUP)
        _wait_regions(client, set())  # the partition named now does not exist
        assert srv.proc.poll() is None, "SIGHUP stopped the server"
    finally:
        srv.stop()
        srv.kill_agents()
