"""The Slurm backend against a real two-node cluster: offers, a task through an agent started by
the batch script (its output and its `sbatch` resource flags), a pending job with Slurm's reason,
and stop."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dstack.agent.models import AgentJobSubmission
from dstack.core.models.resources import ResourcesSpec
from dstack.core.models.runs import JobTerminationReason
from dstack.server.agent_client import AgentClient
from dstack.server.backends.slurm.backend import SlurmBackend
from dstack.server.backends.slurm.commands import LocalRunner
from dstack.server.backends.slurm.config import SlurmBackendConfig
from tests.slurm.cluster import PARTITION, SlurmCluster


@pytest.fixture
async def backend(slurm_cluster: SlurmCluster, tmp_path: Path) -> AsyncIterator[SlurmBackend]:
    b = SlurmBackend(
        SlurmBackendConfig(shared_dir=str(tmp_path / "shared")),
        tmp_path,
        runner=LocalRunner({"SLURM_CONF": str(slurm_cluster.conf)}),
    )
    yield b
    out = await b.runner.run(["squeue", "-h", "-o", "%i"])
    for job_id in out.stdout.split():  # nothing a test left running holds the nodes for the next
        await b.runner.run(["scancel", job_id])
    await b.shutdown()


def _spec(**kw: object) -> ResourcesSpec:
    return ResourcesSpec.model_validate({"cpu": 1, "memory": "1GB", "disk": "1GB..", **kw})


async def _wait_state(b: SlurmBackend, job_id: str, want: set[str], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        st = await b.state(job_id)
        seen = st.state if st else "gone"
        if seen in want:
            return seen
        await asyncio.sleep(0.3)
    raise AssertionError(f"job {job_id} is {seen}, not in {want}")


async def test_offers_are_partition_by_node_shape(backend: SlurmBackend) -> None:
    offers = await backend.offers()
    assert {o.backend for o in offers} == {"slurm"}
    assert {o.region for o in offers} == {PARTITION}
    by_gpus = {len(o.resources.gpus): o for o in offers}
    assert set(by_gpus) == {0, 1}  # sn1 has a fake GPU, sn2 none: two shapes
    assert by_gpus[1].resources.gpus[0]["name"] == "fake"
    assert by_gpus[1].instance_name == f"{PARTITION}:sn1"
    assert by_gpus[0].resources.cpus == 4 and by_gpus[0].resources.memory_mib == 16384
    gpu_only = await backend.offers(_spec(gpu=1))
    assert [o.instance_name for o in gpu_only] == [f"{PARTITION}:sn1"]
    assert await backend.offers(_spec(cpu=64)) == []


async def test_task_output_and_resource_flags(backend: SlurmBackend, slurm_cluster: SlurmCluster) -> None:
    spec = _spec(cpu=2, memory="2GB", gpu="fake:1")
    sub = await backend.submit("dstack-flags-0", spec, max_duration=600)
    # The flags reached Slurm: what `scontrol show job` reports for the allocation.
    assert slurm_cluster.job_field(sub.job_id, "CPUs/Task") == "2"
    assert slurm_cluster.job_field(sub.job_id, "TimeLimit") == "00:10:00"
    assert slurm_cluster.job_field(sub.job_id, "Partition") == PARTITION
    tres = slurm_cluster.job_field(sub.job_id, "TRES")
    assert "mem=2G" in tres and "cpu=2" in tres, tres
    assert slurm_cluster.job_field(sub.job_id, "TresPerNode") == "gres:gpu:fake:1"
    endpoint, node = await backend.agent(sub)
    assert node == "sn1"  # the only node with the GPU
    assert endpoint.url.startswith(f"http://{slurm_cluster.nodes[0].address}:")  # on the node, not loopback
    client = AgentClient(endpoint)
    try:
        await client.submit(AgentJobSubmission(job_id="j1", commands=['echo "hello from $(hostname)"']))
        await client.start("j1")
        logs, state = await _pull_all(client, "j1")
    finally:
        await client.close()
    assert "hello from sn1" in logs
    assert state == "done"
    await backend.cancel(sub.job_id, grace=5)
    assert (
        await _wait_state(backend, sub.job_id, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    )  # a graceful stop


async def _pull_all(client: AgentClient, job_id: str, timeout: float = 60) -> tuple[str, str]:
    cursor, logs, state = 0, "", ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await client.pull(job_id, cursor, state or None, wait=2)
        records = r.get("logs", [])
        logs += "".join(base64.b64decode(rec["data"]).decode(errors="replace") for rec in records)
        cursor = r["next_cursor"] if records else cursor
        state = r["state"]
        if state in ("done", "failed", "terminated", "aborted"):
            return logs, state
    raise AssertionError(f"job {job_id} did not finish: {state} {json.dumps(logs)[:500]}")


async def test_pending_job_shows_slurm_reason_and_stop_cancels(backend: SlurmBackend) -> None:
    spec = _spec(gpu="fake:1")
    first = await backend.submit("dstack-gpu-a", spec)
    await _wait_state(backend, first.job_id, {"RUNNING"})
    second = await backend.submit("dstack-gpu-b", spec)  # the only GPU is taken
    deadline = time.monotonic() + 20
    st = await backend.state(second.job_id)
    while st is not None and st.reason in ("None", "") and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        st = await backend.state(second.job_id)
    assert st is not None and st.pending
    assert st.reason == "Resources", st
    assert st.message() == f"Slurm job {second.job_id} PENDING (Resources)"
    # Stop: the pending one is cancelled outright, the running one after SIGTERM.
    await backend.cancel(second.job_id, grace=5)
    await backend.cancel(first.job_id, grace=5)
    pending = await backend.state(second.job_id)
    assert pending is not None and pending.state == "CANCELLED", pending
    assert pending.termination_reason() == JobTerminationReason.TERMINATED_BY_SERVER
    running = await backend.state(first.job_id)
    assert running is not None and running.state == "COMPLETED", running  # its agent stopped on SIGTERM
    assert running.nodes == ["sn1"]
