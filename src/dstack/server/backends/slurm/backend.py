"""The Slurm backend: offers from `sinfo`, one Slurm job per dstack job, whose batch script runs
dstack's agent in the allocation; the server reaches that agent on the compute node.

Files live under the shared directory (`shared_dir`, default the server's `slurm/` directory when
Slurm's commands run on this host): `jobs/<name>/token` (0600, read by the agent with
`--token-file`), `jobs/<name>/home` (the agent's home, its `agent.json` tells the port) and
`jobs/<name>/slurm.out`. They are read and written with the same transport as Slurm's commands,
so a login host works like this host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from dstack.core.daemon import child_pythonpath
from dstack.core.models.resources import Range, ResourcesSpec
from dstack.core.models.runs import InstanceOffer, InstanceResources
from dstack.server.backends.base import AgentEndpoint, Backend, ProvisionedInstance
from dstack.server.backends.slurm.commands import CommandRunner, SlurmCommandError, runner_for
from dstack.server.backends.slurm.config import SlurmBackendConfig
from dstack.server.backends.slurm.jobs import (
    FINAL_STATES,
    SlurmJobState,
    agent_home,
    batch_script,
    parse_scontrol_job,
    sbatch_options,
)
from dstack.server.backends.slurm.offers import SINFO_FORMAT, SlurmShape, parse_sinfo, shapes
from dstack.server.services.offers import fits_total

logger = logging.getLogger(__name__)

_JOB_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
_JOB_ID = re.compile(r"^\d+(_\d+)?$")


class SlurmBackendError(Exception):
    """Submitting or reading a Slurm job failed; the message is for the user."""


@dataclass(frozen=True)
class SlurmSubmission:
    job_id: str
    name: str
    partition: str
    job_dir: str
    nodes: int = 1  # one agent per node, `home/<rank>` when more than one


def _without_disk(spec: ResourcesSpec) -> ResourcesSpec:
    """Slurm does not schedule disk (no `--tmp` unless nodes declare TmpDisk): it is not matched."""
    return spec.model_copy(update={"disk": Range[float](min=None, max=None)})


class SlurmBackend(Backend):
    name = "slurm"

    def __init__(
        self,
        config: SlurmBackendConfig,
        default_dir: Path,
        runner: CommandRunner | None = None,
        python: str = sys.executable,
    ) -> None:
        if config.login is not None and config.shared_dir is None:
            raise SlurmBackendError("slurm: a backend with a login host needs shared_dir (where nodes find the agent)")
        self.config = config
        self.runner = runner or runner_for(config.login)
        self.dir = config.shared_dir or str(default_dir)
        self.python = python
        #: instance name -> (the instance as the server reaches it, the agent's node address, port)
        self._reached: dict[str, tuple[ProvisionedInstance, str, int]] = {}

    async def ensure_instances(self, known: dict[str, AgentEndpoint]) -> list[ProvisionedInstance]:
        return []  # no standing instances: each job gets its own allocation

    async def shutdown(self) -> None:
        self._reached.clear()
        await self.runner.close()

    # -- reaching agents -----------------------------------------------------------------------

    async def reach(self, inst: ProvisionedInstance) -> ProvisionedInstance:
        """`inst` with its agent's URL as the server reaches it: the node's address, or with a
        login host a local port forwarded over its SSH connection (compute nodes are often not
        routable from the server; the login host is). Remembered for `recover_instance`."""
        parts = urlsplit(inst.agent.url)
        address, port = parts.hostname or inst.hostname, parts.port or 80
        host, local = await self.runner.forward(address, port)
        url = f"http://{host}:{local}"
        reached = replace(inst, agent=replace(inst.agent, url=url))
        if (host, local) != (address, port):
            self._reached[inst.name] = (reached, address, port)
            logger.info(
                "the agent of %s (%s:%s) is reached through the login host at %s", inst.name, address, port, url
            )
        return reached

    async def recover_instance(self, name: str, lost: AgentEndpoint) -> ProvisionedInstance | None:
        """The forward to an agent stopped answering: re-open it (the login host's connection
        dropped and was re-made); None when the forward in use is still the current one."""
        found = self._reached.get(name)
        if found is None:
            return None
        inst, address, port = found
        host, local = await self.runner.forward(address, port)
        url = f"http://{host}:{local}"
        if url == lost.url:
            return None
        reached = replace(inst, agent=replace(inst.agent, url=url))
        self._reached[name] = (reached, address, port)
        logger.info("the agent of %s is reached through a re-opened forward at %s", name, url)
        return reached

    async def release(self, name: str) -> None:
        """The instance's job is over: close the forward to its agent, if it had one."""
        found = self._reached.pop(name, None)
        if found is not None:
            await self.runner.close_forward(found[1], found[2])

    # -- offers --------------------------------------------------------------------------------

    async def shapes(self) -> list[SlurmShape]:
        out = await self.runner.check(["sinfo", "-h", "-N", "-o", SINFO_FORMAT])
        return shapes(parse_sinfo(out), self.config.partitions)

    async def offers(self, spec: ResourcesSpec | None = None) -> list[InstanceOffer]:
        """Partition × node shape; with `spec`, only those that could ever run it."""
        found = await self.shapes()
        if spec is not None:
            found = [s for s in found if fits_total(_without_disk(spec), s.resources)]
        return [s.offer() for s in found]

    # -- jobs ----------------------------------------------------------------------------------

    async def submit(
        self,
        name: str,
        spec: ResourcesSpec,
        *,
        partition: str | None = None,
        max_duration: int | None = None,
        nodes: int = 1,
        known_shapes: list[SlurmShape] | None = None,
    ) -> SlurmSubmission:
        """Submit one Slurm job running an agent; the partition is the first that fits (free first).

        `known_shapes` (the registry's cache) spares an `sinfo`; the token file is written by the
        same command that runs `sbatch` (one command over the transport, the token on its stdin)."""
        if not _JOB_NAME.match(name):
            raise SlurmBackendError(f"slurm: invalid job name {name!r}")
        candidates = known_shapes if known_shapes else await self.shapes()
        fitting = [s for s in candidates if fits_total(_without_disk(spec), s.resources)]
        if partition is not None:
            fitting = [s for s in fitting if s.partition == partition]
        if not fitting:
            raise SlurmBackendError(f"slurm: no partition has nodes for {spec.pretty_format()}")
        fitting.sort(key=lambda s: s.available == 0)
        shape = fitting[0]
        job_dir = f"{self.dir}/jobs/{name}"
        token_file = f"{job_dir}/token"
        q = shlex.quote
        options = sbatch_options(
            spec,
            self.config,
            partition=shape.partition,
            job_name=name,
            output=f"{job_dir}/slurm.out",
            max_duration=max_duration,
            gpu_type=shape.gpu_type,
            nodes=nodes,
        )
        script = batch_script(self.python, child_pythonpath(), f"{job_dir}/home", token_file, nodes=nodes)
        # The first line of stdin is the token (read by the shell's builtin, written 0600, never
        # on a command line); the rest is the batch script, read by sbatch.
        command = (
            f"(umask 077 && mkdir -p {q(job_dir)}/home && IFS= read -r t && printf '%s' \"$t\" > {q(token_file)})"
            f" && exec {shlex.join(['sbatch', *options])}"
        )
        try:
            out = await self.runner.check(["sh", "-c", command], stdin=secrets.token_hex(24) + "\n" + script)
        except SlurmCommandError as e:
            raise SlurmBackendError(f"slurm: sbatch refused the job: {e}") from e
        job_id = out.strip().split(";")[0]
        if not _JOB_ID.match(job_id):
            raise SlurmBackendError(f"slurm: sbatch answered {out.strip()[:200]!r}, not a job id")
        logger.info("submitted Slurm job %s (%s) to partition %s", job_id, name, shape.partition)
        return SlurmSubmission(job_id=job_id, name=name, partition=shape.partition, job_dir=job_dir, nodes=nodes)

    async def state(self, job_id: str) -> SlurmJobState | None:
        """The job's state, reason and nodes; None once Slurm forgot it (past MinJobAge)."""
        _check_id(job_id)
        r = await self.runner.run(["scontrol", "show", "job", "-o", job_id])
        if r.code != 0:
            if "Invalid job id" in r.stderr:
                return None
            raise SlurmBackendError(f"slurm: scontrol show job {job_id} failed: {r.stderr.strip()[:500]}")
        st = parse_scontrol_job(r.stdout)
        if st is not None and st.nodes:
            names = await self.runner.check(["scontrol", "show", "hostnames", st.nodes[0]])
            st = SlurmJobState(st.job_id, st.state, st.reason, names.split(), st.exit_code)
        return st

    async def node_address(self, node: str) -> str:
        out = await self.runner.check(["scontrol", "show", "node", "-o", node])
        m = re.search(r"\bNodeAddr=(\S+)", out)
        if m is None:
            raise SlurmBackendError(f"slurm: scontrol show node {node} has no NodeAddr")
        return m.group(1)

    async def find(self, name: str) -> str | None:
        """The id of a Slurm job of ours named `name` that is not over (a submission made before a
        server restart), so nothing is submitted twice."""
        if not _JOB_NAME.match(name):
            raise SlurmBackendError(f"slurm: invalid job name {name!r}")
        out = await self.runner.check(["squeue", "-h", "-n", name, "-o", "%i %T"])
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and _JOB_ID.match(parts[0]) and parts[1] not in FINAL_STATES:
                return parts[0]
        return None

    async def try_agent(
        self, sub: SlurmSubmission, st: SlurmJobState, wait: float = 0.0, rank: int = 0
    ) -> tuple[AgentEndpoint, str] | None:
        """The agent of a RUNNING job (on node `rank` of its allocation) once it wrote `agent.json`:
        its endpoint and the node; else None.

        With `wait`, the check repeats every 50 ms for up to that long on the side that runs Slurm's
        commands (one command over the transport, not one per check): the agent is noticed within
        50 ms of writing the file instead of at the next poll. The same command reads the node's
        address once the file is there (no second round trip)."""
        if st.state != "RUNNING" or len(st.nodes) <= rank:
            return None
        q = shlex.quote
        node = st.nodes[rank]
        agent_json = f"{q(agent_home(f'{sub.job_dir}/home', sub.nodes, rank))}/agent.json"
        checks = max(0, min(200, int(wait / 0.05)))
        script = (
            f"i=0; while [ ! -s {agent_json} ] && [ $i -lt {checks} ]; do sleep 0.05; i=$((i+1)); done; "
            f"cat {agent_json} 2>/dev/null; echo; cat {q(sub.job_dir)}/token; echo; "
            f"[ -s {agent_json} ] && scontrol show node -o {q(node)}"
        )
        r = await self.runner.run(["sh", "-c", script])
        lines = r.stdout.splitlines()
        if len(lines) < 2 or not lines[0].strip():
            return None
        try:
            info = json.loads(lines[0])
            port, pid = int(info["port"]), int(info["pid"])
        except (ValueError, KeyError, TypeError):
            return None
        m = re.search(r"\bNodeAddr=(\S+)", "\n".join(lines[2:]))
        address = m.group(1) if m is not None else await self.node_address(node)
        return AgentEndpoint(url=f"http://{address}:{port}", token=lines[1].strip(), pid=pid), node

    async def agent(self, sub: SlurmSubmission, timeout: float = 60.0) -> tuple[AgentEndpoint, str]:
        """Wait until the job runs and its agent wrote `agent.json`: the endpoint and the node name."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            st = await self.state(sub.job_id)
            if st is None or st.final:
                raise SlurmBackendError(
                    f"slurm: job {sub.job_id} ended before its agent started: {st.message() if st else 'gone'}"
                )
            found = await self.try_agent(sub, st, wait=1.0 if st.state == "RUNNING" else 0.0)
            if found is not None:
                return found
            if st.state != "RUNNING":
                await asyncio.sleep(0.3)
        raise SlurmBackendError(f"slurm: the agent of job {sub.job_id} did not start within {timeout:g} s")

    async def agent_on(self, st: SlurmJobState, node: str, partition: str) -> AgentEndpoint | None:
        """The agent a running allocation started on `node`, read again from its `agent.json`
        (a restarted server re-attaching through a login host: the forward it stored is gone)."""
        if node not in st.nodes:
            return None
        r = await self.runner.run(["scontrol", "show", "job", "-o", st.job_id])
        m = re.search(r"\bJobName=(\S+)", r.stdout)
        if r.code != 0 or m is None or not _JOB_NAME.match(m.group(1)):
            return None
        sub = self.submission(st.job_id, m.group(1), partition, len(st.nodes))
        found = await self.try_agent(sub, st, rank=st.nodes.index(node))
        return found[0] if found is not None else None

    def submission(self, job_id: str, name: str, partition: str, nodes: int = 1) -> SlurmSubmission:
        """The submission of a job found by `find` (same files as `submit` made)."""
        return SlurmSubmission(
            job_id=job_id, name=name, partition=partition, job_dir=f"{self.dir}/jobs/{name}", nodes=nodes
        )

    async def cancel(self, job_id: str, grace: float = 10.0) -> None:
        """Stop: SIGTERM to the batch step (the agent stops its job), then `scancel` after `grace`."""
        _check_id(job_id)
        st = await self.state(job_id)
        if st is None or st.final:
            return
        if st.state == "RUNNING":  # a pending job has no batch step to signal: cancelled outright
            await self.runner.run(["scancel", "--batch", "--signal=TERM", job_id])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while loop.time() < deadline:
                st = await self.state(job_id)
                if st is None or st.final:
                    return
                await asyncio.sleep(0.3)
        await self.runner.check(["scancel", job_id])

    def instance(
        self, sub: SlurmSubmission, node: str, agent: AgentEndpoint, spec: ResourcesSpec
    ) -> ProvisionedInstance:
        """The job's allocation as an instance (what it asked for, on `node`)."""
        res = InstanceResources(
            cpus=max(1, spec.cpu.min or 1),
            memory_mib=int(round(float(spec.memory.min or 0) * 1024)),
            disk_mib=0,
        )
        return ProvisionedInstance(
            name=f"slurm-{sub.job_id}",
            backend=self.name,
            region=sub.partition,
            hostname=node,
            resources=res,
            price=0.0,
            agent=agent,
        )


def _check_id(job_id: str) -> None:
    if not _JOB_ID.match(job_id):
        raise SlurmBackendError(f"slurm: invalid job id {job_id!r}")
