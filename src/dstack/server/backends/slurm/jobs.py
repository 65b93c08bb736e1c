"""A dstack job as a Slurm job: `sbatch` options from its resources, the batch script that
starts dstack's agent in the allocation, and Slurm's job states read back."""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass

from dstack.core.models.resources import ResourcesSpec
from dstack.core.models.runs import JobTerminationReason
from dstack.server.backends.slurm.config import SlurmBackendConfig

MIB_PER_GB = 1024

#: Slurm's job states that are over, and the termination reason each means for dstack
FINAL_STATES: dict[str, JobTerminationReason] = {
    "COMPLETED": JobTerminationReason.DONE_BY_RUNNER,
    "FAILED": JobTerminationReason.CONTAINER_EXITED_WITH_ERROR,
    "OUT_OF_MEMORY": JobTerminationReason.CONTAINER_EXITED_WITH_ERROR,
    "TIMEOUT": JobTerminationReason.MAX_DURATION_EXCEEDED,
    "DEADLINE": JobTerminationReason.MAX_DURATION_EXCEEDED,
    "NODE_FAIL": JobTerminationReason.INSTANCE_UNREACHABLE,  # retry on `interruption`
    "PREEMPTED": JobTerminationReason.INTERRUPTED_BY_NO_CAPACITY,
    "BOOT_FAIL": JobTerminationReason.FAILED_TO_START_DUE_TO_NO_CAPACITY,  # retry on `no-capacity`
    "CANCELLED": JobTerminationReason.TERMINATED_BY_SERVER,  # a stop through dstack is recorded before
    "REVOKED": JobTerminationReason.TERMINATED_BY_SERVER,
    "SPECIAL_EXIT": JobTerminationReason.CONTAINER_EXITED_WITH_ERROR,
}
PENDING_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED"}


@dataclass(frozen=True)
class SlurmJobState:
    job_id: str
    state: str  # Slurm's JobState (PENDING, RUNNING, COMPLETED, ...)
    reason: str  # Slurm's Reason (Resources, Priority, None, ...)
    nodes: list[str]  # the allocation's node names (empty while pending)
    exit_code: str

    @property
    def pending(self) -> bool:
        return self.state in PENDING_STATES

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def termination_reason(self) -> JobTerminationReason | None:
        return FINAL_STATES.get(self.state)

    def message(self) -> str:
        """What dstack shows: Slurm's state with its reason (`PENDING (Resources)`)."""
        if self.reason and self.reason != "None":
            return f"Slurm job {self.job_id} {self.state} ({self.reason})"
        return f"Slurm job {self.job_id} {self.state}"


def format_time(seconds: int) -> str:
    """`--time` as `D-HH:MM:SS`, rounded up to whole minutes (Slurm's granularity)."""
    minutes = max(1, math.ceil(seconds / 60))
    d, rem = divmod(minutes, 24 * 60)
    h, m = divmod(rem, 60)
    return f"{d}-{h:02d}:{m:02d}:00"


def sbatch_options(
    spec: ResourcesSpec,
    config: SlurmBackendConfig,
    *,
    partition: str,
    job_name: str,
    output: str,
    max_duration: int | None = None,
    gpu_type: str | None = None,
    nodes: int = 1,
) -> list[str]:
    """The `sbatch` options for a job: the lower bound of each resource range, as dstack reserves."""
    opts = [
        "--parsable",
        f"--job-name={job_name}",
        f"--partition={partition}",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={max(1, spec.cpu.min or 1)}",
        f"--output={output}",
        "--open-mode=append",
    ]
    if spec.memory.min is not None:
        opts.append(f"--mem={max(1, int(round(float(spec.memory.min) * MIB_PER_GB)))}M")
    if spec.gpu is not None and (spec.gpu.count.min or 0) > 0:
        opts.append(f"--gres=gpu:{gpu_type + ':' if gpu_type else ''}{spec.gpu.count.min}")
    if max_duration is not None:
        opts.append(f"--time={format_time(max_duration)}")
    if config.account:
        opts.append(f"--account={config.account}")
    if config.qos:
        opts.append(f"--qos={config.qos}")
    return opts


def agent_home(job_home: str, nodes: int, rank: int) -> str:
    """Where the agent of node `rank` lives: the job's home, or one folder per node (`home/<rank>`)."""
    return job_home if nodes == 1 else f"{job_home}/{rank}"


def batch_script(python: str, pythonpath: str, agent_home: str, token_file: str, nodes: int = 1) -> str:
    """The batch script: the agent for this job, on every address of the node (its token guards it).

    With `nodes` > 1 one `srun` step runs an agent on every node of the allocation, in
    `agent_home/<rank>` (rank = `SLURM_PROCID`, the node's position in Slurm's node list).

    A stop is `scancel --batch --signal=TERM`: the script passes SIGTERM on (srun forwards it to
    its tasks), the agent stops its job, and the Slurm job ends COMPLETED (the reason for the stop
    is dstack's own record); any other end of the agent is the script's exit status (FAILED)."""
    q = shlex.quote
    # --announce-early: agent.json as soon as the socket listens, so the server attaches while the
    # agent's Python is still importing (its requests wait in the socket's backlog).
    agent = f"{q(python)} -m dstack.agent --host 0.0.0.0 --port 0 --announce-early"
    if nodes == 1:
        start = [
            f"mkdir -p {q(agent_home)} || exit 1",
            f"{agent} --home {q(agent_home)} --token-file {q(token_file)} &",
        ]
    else:
        per_node = (
            f'd={q(agent_home)}/"$SLURM_PROCID" && mkdir -p "$d" && '
            f'exec {agent} --home "$d" --token-file {q(token_file)}'
        )
        start = [
            f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1"
            f' --cpus-per-task="${{SLURM_CPUS_PER_TASK:-1}}" --kill-on-bad-exit=0 sh -c {q(per_node)} &',
        ]
    return "\n".join(
        [
            "#!/bin/sh",
            f"export PYTHONPATH={q(pythonpath)}",
            *start,
            "agent=$!",
            'trap \'kill -TERM "$agent" 2>/dev/null; wait "$agent"; exit 0\' TERM INT',
            'wait "$agent"',
            "exit $?",
            "",
        ]
    )


def parse_scontrol_job(text: str) -> SlurmJobState | None:
    """`scontrol show job -o ID` (one line of `Key=Value`); None when the job is unknown."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    if "JobId" not in fields or "JobState" not in fields:
        return None
    nodelist = fields.get("NodeList", "")
    return SlurmJobState(
        job_id=fields["JobId"],
        state=fields["JobState"],
        reason=fields.get("Reason", "None"),
        nodes=[] if nodelist in ("", "(null)") else [nodelist],  # expanded by the caller (`hostnames`)
        exit_code=fields.get("ExitCode", ""),
    )
