"""dstack's overhead over Slurm itself, in the same run on the same cluster: submit → RUNNING of a
plain `sbatch --wrap` job versus a dstack task pinned to `backends: [slurm]` (submit → the run
RUNNING: the Slurm job started, the agent up in the allocation, the job started by it). The
cluster is tests/slurm/cluster.py's (two nodes in network namespaces); needs root and Debian's
slurmctld/slurmd/munge/slurm-client.

    python bench/slurm/bench_overhead.py [--runs N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from dstack.api import Resources, RunStatus, Task  # noqa: E402
from tests.conftest import TEST_SERVER_ENV, make_server  # noqa: E402
from tests.slurm.cluster import PARTITION, SlurmCluster  # noqa: E402


def quiet(cluster: SlurmCluster, timeout: float = 30.0) -> None:
    """Wait until Slurm holds no job (none pending, running or completing), then 0.5–1.5 s more.

    Each measure starts from the same cluster state: a job submitted while the previous one is
    still completing waits for the controller's next scheduling pass (about 1 s later) instead of
    being placed at once, and the submission right after the other path's `scancel` would pay that
    every time. The random pause keeps either measure from locking onto the scheduler's phase."""
    deadline = time.monotonic() + timeout
    while cluster.cli("squeue", "-h", "-o", "%i").stdout.strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0.5, 1.5))


def plain(cluster: SlurmCluster) -> float:
    quiet(cluster)
    t0 = time.monotonic()
    job = cluster.cli("sbatch", "--parsable", "--wrap", "sleep 30").stdout.strip()
    while cluster.job_field(job, "JobState") != "RUNNING":
        time.sleep(0.02)
    took = time.monotonic() - t0
    cluster.cli("scancel", job)
    return took


def dstack_task(client, cluster: SlurmCluster, i: int) -> float:  # type: ignore[no-untyped-def]
    quiet(cluster)
    task = Task(commands=["sleep 30"], backends=["slurm"], resources=Resources(cpu=1, memory="1GB", disk="1GB.."))
    t0 = time.monotonic()
    run = client.runs.submit(task, run_name=f"bench-slurm-{i}")
    while True:
        run.refresh()
        if run.status == RunStatus.RUNNING:
            break
        if run.status.is_finished():
            raise RuntimeError(f"run ended: {run.status} {run.error}")
        time.sleep(0.02)
    took = time.monotonic() - t0
    run.stop()
    return took


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        with SlurmCluster(base / "cluster") as cluster:
            time.sleep(4)  # the controller schedules batch jobs a few seconds after it starts
            srv = make_server(base, **TEST_SERVER_ENV, SLURM_CONF=str(cluster.conf))
            (srv.home / "server").mkdir(parents=True, exist_ok=True)
            (srv.home / "server" / "config.yml").write_text(
                f"projects:\n  - name: main\n    backends:\n      - type: slurm\n"
                f"        partitions: [{PARTITION}]\n        shared_dir: {base / 'shared'}\n"
            )
            srv.start()
            try:
                client = srv.client()
                plain(cluster)  # warm-up of both paths
                dstack_task(client, cluster, -1)
                sb, ds = [], []
                for i in range(args.runs):  # interleaved: both see the same cluster state
                    sb.append(plain(cluster))
                    ds.append(dstack_task(client, cluster, i))
            finally:
                srv.stop()
                srv.kill_agents()
    print(
        "runs (ms), plain / dstack:", ", ".join(f"{a * 1000:.0f}/{b * 1000:.0f}" for a, b in zip(sb, ds, strict=True))
    )
    p50_sb, p50_ds = statistics.median(sb), statistics.median(ds)
    print(f"sbatch --wrap submit → RUNNING:      p50 {p50_sb * 1000:7.0f} ms  max {max(sb) * 1000:7.0f} ms")
    print(f"dstack task submit → run RUNNING:   p50 {p50_ds * 1000:7.0f} ms  max {max(ds) * 1000:7.0f} ms")
    print(f"added by dstack at p50: {(p50_ds - p50_sb) * 1000:.0f} ms (target ≤ 1000 ms)")


if __name__ == "__main__":
    main()
