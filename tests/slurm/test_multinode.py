"""`nodes: 2` on Slurm: one allocation of two nodes (`sbatch --nodes=2`, an agent per node by
`srun`), ranks in Slurm's node order, DSTACK_MASTER_NODE_IP / DSTACK_NODES_IPS the nodes'
addresses, and the two ranks exchange data over TCP across the two nodes."""

from __future__ import annotations

import time
from pathlib import Path

from dstack.api import Resources, RunStatus, Task
from tests.conftest import ServerProcess
from tests.multinode import ranks_script
from tests.slurm.cluster import SlurmCluster

SCRIPT = ranks_script(29478)  # tests/multinode.py


def test_two_nodes_are_one_allocation_and_talk_over_tcp(
    slurm_server: ServerProcess,
    slurm_cluster: SlurmCluster,
    tmp_path: Path,
) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "ranks.py").write_text(SCRIPT)
    client = slurm_server.client()
    task = Task(
        commands=["python3 ranks.py"],
        nodes=2,
        backends=["slurm"],
        resources=Resources(cpu=1, memory="1GB", disk="1GB.."),
    )
    run = client.runs.submit(task, run_name="slurm-two-nodes", repo_dir=repo)
    output = b"".join(run.logs()).decode()
    run.refresh()
    rank1 = b"".join(run.logs(job_num=1, follow=False)).decode()
    assert run.status == RunStatus.DONE, (run.status, run.error, output, rank1, slurm_server.logs())
    jobs = sorted(run.jobs, key=lambda j: j.job_spec.job_num)
    hosts = [j.job_submissions[-1].job_provisioning_data.hostname for j in jobs]
    by_name = {n.name: n.address for n in slurm_cluster.nodes}
    assert sorted(hosts) == sorted(by_name), hosts  # one node each, both nodes
    first = output.splitlines()[0]
    assert first == f"rank=0 host={hosts[0]} nodes=2 ips={by_name[hosts[0]]},{by_name[hosts[1]]}", output
    assert f"got: hello from {hosts[1]}" in output, (output, rank1)
    assert f"sent to {by_name[hosts[0]]}" in rank1, rank1
    # One Slurm job of two nodes, named after rank 0's job.
    name = f"dstack-{jobs[0].job_submissions[-1].id}"
    ids = slurm_cluster.cli("squeue", "-h", "-t", "all", "-n", name, "-o", "%i").stdout.split()
    assert len(ids) == 1, ids
    assert slurm_cluster.job_field(ids[0], "NumNodes") == "2"
    others = slurm_cluster.cli("squeue", "-h", "-t", "all", "-n", f"dstack-{jobs[1].job_submissions[-1].id}").stdout
    assert not others.strip(), others
    deadline = time.time() + 30  # released once both ranks are over
    while time.time() < deadline and slurm_cluster.job_field(ids[0], "JobState") not in ("COMPLETED", "CANCELLED"):
        time.sleep(0.5)
    assert slurm_cluster.job_field(ids[0], "JobState") in ("COMPLETED", "CANCELLED")
