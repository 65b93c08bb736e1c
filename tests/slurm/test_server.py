"""dstack's server on a Slurm cluster: config.yml names the backend, the plan offers its partitions,
a task pinned to `backends: [slurm]` runs as a Slurm job (its output in the logs, its flags in
`scontrol show job`), a pending one shows Slurm's reason, and a stop cancels it."""

from __future__ import annotations

import time

from dstack.api import Resources, RunStatus, Task
from tests.conftest import ServerProcess
from tests.slurm.cluster import PARTITION, SlurmCluster

SMALL = Resources(cpu=2, memory="1GB", disk="1GB..")


def _slurm_job_of(cluster: SlurmCluster, dstack_job_id: str) -> str:
    out = cluster.cli("squeue", "-h", "-t", "all", "-n", f"dstack-{dstack_job_id}", "-o", "%i").stdout.split()
    assert len(out) == 1, out  # submitted once
    return out[0]


def test_task_runs_as_a_slurm_job(slurm_server: ServerProcess, slurm_cluster: SlurmCluster) -> None:
    client = slurm_server.client()
    task = Task(commands=["hostname", "echo done-on-slurm"], backends=["slurm"], resources=SMALL, max_duration=900)
    plan = client.runs.get_plan(task)
    offers = plan.job_plans[0].offers
    assert offers and {(o.backend, o.region) for o in offers} == {("slurm", PARTITION)}, offers
    run = client.runs.submit(task, run_name="slurm-task")
    output = b"".join(run.logs()).decode()
    run.refresh()
    assert run.status == RunStatus.DONE, (run.status, run.error, output, slurm_server.logs())
    lines = output.splitlines()
    assert lines[0] in {"sn1", "sn2"} and "done-on-slurm" in lines, output
    sub = run.jobs[0].job_submissions[-1]
    jpd = sub.job_provisioning_data
    assert jpd.backend == "slurm" and jpd.region == PARTITION and jpd.hostname == lines[0]
    slurm_id = _slurm_job_of(slurm_cluster, sub.id)
    assert slurm_cluster.job_field(slurm_id, "CPUs/Task") == "2"
    assert slurm_cluster.job_field(slurm_id, "TimeLimit") == "00:15:00"
    assert "mem=1G" in slurm_cluster.job_field(slurm_id, "TRES")
    deadline = time.time() + 30  # the allocation is released once the job is over
    while time.time() < deadline and slurm_cluster.job_field(slurm_id, "JobState") not in ("COMPLETED", "CANCELLED"):
        time.sleep(0.5)
    assert slurm_cluster.job_field(slurm_id, "JobState") in ("COMPLETED", "CANCELLED")


def test_pending_shows_slurm_reason_and_stop_cancels(slurm_server: ServerProcess, slurm_cluster: SlurmCluster) -> None:
    blocker = slurm_cluster.cli("sbatch", "--parsable", "--gres=gpu:1", "--wrap", "sleep 300").stdout.strip()
    deadline = time.time() + 30
    while time.time() < deadline and slurm_cluster.job_field(blocker, "JobState") != "RUNNING":
        time.sleep(0.3)
    client = slurm_server.client()
    task = Task(
        commands=["echo never"],
        backends=["slurm"],
        resources=Resources(cpu=1, memory="1GB", disk="1GB..", gpu=1),
    )
    run = client.runs.submit(task, run_name="slurm-pending")
    shown = ""
    deadline = time.time() + 40
    while time.time() < deadline:
        run.refresh()
        subs = run.jobs[0].job_submissions
        jpd = subs[-1].job_provisioning_data if subs else None
        shown = jpd.instance_name if jpd else ""
        if "PENDING (Resources)" in shown:
            break
        time.sleep(0.5)
    assert "PENDING (Resources)" in shown, (shown, run.status, slurm_server.logs())
    assert run.status in (RunStatus.PROVISIONING, RunStatus.PENDING, RunStatus.SUBMITTED), run.status
    slurm_id = _slurm_job_of(slurm_cluster, run.jobs[0].job_submissions[-1].id)
    run.stop()
    deadline = time.time() + 30
    while time.time() < deadline:
        run.refresh()
        state = slurm_cluster.job_field(slurm_id, "JobState")
        if run.status.is_finished() and state == "CANCELLED":
            break
        time.sleep(0.5)
    assert run.status == RunStatus.TERMINATED, run.status
    assert slurm_cluster.job_field(slurm_id, "JobState") == "CANCELLED"
    slurm_cluster.cli("scancel", blocker)


def _wait_status(run, statuses, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    while time.time() < deadline:
        run.refresh()
        if run.status in statuses:
            return run
        time.sleep(0.3)
    raise AssertionError(f"run {run.name} is {run.status}, not in {statuses}")


def test_server_restart_reattaches_to_running_slurm_job(
    slurm_server: ServerProcess, slurm_cluster: SlurmCluster
) -> None:
    client = slurm_server.client()
    task = Task(
        commands=["for i in $(seq 1 40); do echo tick-$i; sleep 0.25; done"], backends=["slurm"], resources=SMALL
    )
    run = client.runs.submit(task, run_name="slurm-restart")
    _wait_status(run, {RunStatus.RUNNING})
    slurm_server.kill()  # SIGKILL: the Slurm job and its agent keep running
    slurm_server.start()
    run = slurm_server.client().runs.get("slurm-restart")
    output = b"".join(run.logs()).decode()
    run.refresh()
    assert run.status == RunStatus.DONE, (run.status, run.error, output, slurm_server.logs())
    ticks = [line for line in output.splitlines() if line.startswith("tick-")]
    assert ticks == [f"tick-{i}" for i in range(1, 41)], output  # every line once
    _slurm_job_of(slurm_cluster, run.jobs[0].job_submissions[-1].id)  # submitted once


def test_node_failure_ends_the_job_and_retry_resubmits(
    slurm_server: ServerProcess, slurm_cluster: SlurmCluster
) -> None:
    client = slurm_server.client()
    task = Task(
        commands=["hostname", "sleep 15", "echo finished"],
        backends=["slurm"],
        resources=SMALL,
        retry={"on_events": ["interruption"], "duration": "10m"},
    )
    run = client.runs.submit(task, run_name="slurm-node-fail")
    _wait_status(run, {RunStatus.RUNNING})
    first = run.jobs[0].job_submissions[-1]
    node = next(n for n in slurm_cluster.nodes if n.name == first.job_provisioning_data.hostname)
    slurm_cluster.kill_node(node)  # slurmd and everything in its namespace, the agent included
    try:
        run = _wait_status(run, {RunStatus.DONE, RunStatus.FAILED, RunStatus.TERMINATED}, timeout=150)
        subs = run.jobs[0].job_submissions
        assert run.status == RunStatus.DONE, (run.status, run.error, subs, slurm_server.logs())
        assert len(subs) >= 2, subs
        assert subs[0].termination_reason == "instance_unreachable", subs[0]
        assert subs[-1].job_provisioning_data.hostname != node.name
        output = b"".join(run.logs()).decode()
        assert "finished" in output, output
    finally:
        slurm_cluster.start_node(node)
        slurm_cluster.wait_nodes_idle(timeout=60)


def test_restart_while_pending_submits_once(slurm_server: ServerProcess, slurm_cluster: SlurmCluster) -> None:
    blocker = slurm_cluster.cli("sbatch", "--parsable", "--gres=gpu:1", "--wrap", "sleep 300").stdout.strip()
    deadline = time.time() + 30
    while time.time() < deadline and slurm_cluster.job_field(blocker, "JobState") != "RUNNING":
        time.sleep(0.3)
    client = slurm_server.client()
    task = Task(
        commands=["echo ran-once"], backends=["slurm"], resources=Resources(cpu=1, memory="1GB", disk="1GB..", gpu=1)
    )
    run = client.runs.submit(task, run_name="slurm-pending-restart")
    deadline = time.time() + 40
    while time.time() < deadline:
        run.refresh()
        subs = run.jobs[0].job_submissions
        jpd = subs[-1].job_provisioning_data if subs else None
        if jpd is not None and "PENDING" in jpd.instance_name:
            break
        time.sleep(0.3)
    job_id = run.jobs[0].job_submissions[-1].id
    _slurm_job_of(slurm_cluster, job_id)
    slurm_server.kill()
    slurm_server.start()  # finds the pending Slurm job by its name instead of submitting another
    slurm_cluster.cli("scancel", blocker)
    run = slurm_server.client().runs.get("slurm-pending-restart")
    output = b"".join(run.logs()).decode()
    run.refresh()
    assert run.status == RunStatus.DONE, (run.status, run.error, output, slurm_server.logs())
    assert "ran-once" in output
    _slurm_job_of(slurm_cluster, job_id)  # still exactly one Slurm job for the dstack job
