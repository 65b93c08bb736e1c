"""A `provisioning` job that has an instance but not yet an agent that knows it: build what the
agent is sent (`build_submission`, pure), then submit it, upload the code and start it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from dstack.agent import devenv
from dstack.agent.models import AgentJobSubmission
from dstack.core.models.configurations import BaseRunConfiguration
from dstack.core.models.runs import JobSpec, RunSpec, RunType
from dstack.server.agent_client import AgentClient, AgentError
from dstack.server.models import CodeModel, InstanceModel, JobModel, RepoModel, RunModel
from dstack.server.services import offers, secret_store
from dstack.server.services.engines import engine_submission
from dstack.server.services.jobs import dstack_env, nodes_count
from dstack.server.services.secrets import reveal_env, reveal_registry_auth


def venv_key(project_id: str, spec: JobSpec) -> str | None:
    """Jobs of one project with the same python + setup share one prepared venv on the agent
    (kept across runs), so their `pip install`s are paid once. Scoped per project, so one
    project's setup never changes what another's jobs import. No setup: a fresh venv per job."""
    if not spec.setup:
        return None
    return hashlib.sha256(json.dumps([project_id, spec.python, spec.setup]).encode()).hexdigest()[:16]


def build_submission(
    run: RunModel,
    job: JobModel,
    run_spec: RunSpec,
    conf: BaseRunConfiguration,
    inst: InstanceModel,
    node_ips: list[str] | None = None,
) -> AgentJobSubmission:
    """The agent's job submission: the job's spec with its stored credentials decrypted, the
    resources reserved for it, and how the host runs it. Built as the agent's own wire model,
    so a field the agent would refuse fails here, naming it."""
    spec = JobSpec.model_validate_json(job.job_spec)
    reservation = offers.Reservation.from_dict(json.loads(job.reserved or "{}"))
    env = reveal_env(spec.env)  # stored encrypted (services.secrets)
    env.update(dstack_env(run.run_name, run.id, spec, nodes_count(conf), reservation.gpus, inst.hostname))
    if node_ips:  # a multi-node run across hosts: their internal addresses, by node rank
        env["DSTACK_MASTER_NODE_IP"] = node_ips[0]
        env["DSTACK_NODES_IPS"] = "\n".join(node_ips)
    # The built-in engine ships with dstack: engine jobs run it with the agent's Python.
    env.setdefault("DSTACK_ENGINE_PYTHON", sys.executable)
    if run.run_type == RunType.DEV_ENVIRONMENT:  # its SSH server (agent/devenv.py): where, and whose key
        env[devenv.PORT_ENV] = str(devenv.ssh_port(job.id))
        env[devenv.KEY_ENV] = run_spec.ssh_key_pub or ""
    serverless = run.run_type == RunType.SERVERLESS
    fields: dict[str, Any] = {
        "job_id": job.id,
        "run_name": run.run_name,
        "project_id": run.project_id,  # the agent runs each project's jobs as its own user
        "commands": spec.commands,
        "setup": spec.setup,
        "env": env,
        "working_dir": spec.working_dir,
        "python": spec.python,
        "image": spec.image,
        "shell": spec.shell,
        "entrypoint": spec.entrypoint,
        "user": spec.user,
        "home_dir": spec.home_dir,
        "privileged": spec.privileged,
        "registry_auth": reveal_registry_auth(run_spec.configuration) if spec.image else None,
        "gpus": reservation.gpus,
        "ports": spec.ports,
        "stop_grace_seconds": spec.stop_grace_seconds,
        # Replicas of a service share one fixed port: each gets its own network namespace. A Slurm
        # allocation is the job's own and its ports are reached on the node's address: host network.
        "network": "isolated"
        if (run.run_type == RunType.SERVICE or spec.ports) and inst.backend != "slurm"
        else "host",
        "venv_key": venv_key(run.project_id, spec),
        # Serverless workers start from the venv's warm zygote (agent.prewarm),
        # unless the configuration's env says DSTACK_PREWARM=0 ...
        "prewarm": serverless and env.get("DSTACK_PREWARM") != "0",
        # ... and run the runpod SDK's job loops event-driven (agent.workersite),
        # unless it says DSTACK_RUNPOD_LOOP=0.
        "worker_site": serverless and env.get("DSTACK_RUNPOD_LOOP") != "0",
    }
    # GPU hosts: TGI's image or vLLM instead of the built-in engine.
    fields.update(engine_submission(conf, reservation.gpus, json.loads(inst.agent or "{}"), env))
    return AgentJobSubmission.model_validate(fields)


async def resolve_secrets(session: AsyncSession, project_id: str, submission: AgentJobSubmission) -> AgentJobSubmission:
    """`${{ secrets.NAME }}` references resolved, now and for the agent alone
    (services.secret_store); `secret_env` names the variables that hold one."""
    auth = submission.registry_auth.model_dump() if submission.registry_auth else None
    env, auth, secret_env = await secret_store.resolve(session, project_id, submission.env, auth)
    return AgentJobSubmission.model_validate(
        {**submission.model_dump(), "env": env, "registry_auth": auth, "secret_env": secret_env}
    )


async def submit_to_agent(client: AgentClient, submission: AgentJobSubmission, code: bytes) -> dict[str, Any]:
    """Submit, upload the code, start: the agent's answer to the start."""
    await client.submit(submission)
    await client.upload_code(submission.job_id, code)
    return await client.start(submission.job_id)


async def code_blob(session: AsyncSession, project_id: str, run_spec: RunSpec) -> bytes:
    """The run's uploaded code archive (empty when it has none), with dstack's official client's
    `files:` archives put in at their paths (services.file_archives)."""
    code = await _repo_code(session, project_id, run_spec)
    if not run_spec.file_archives:
        return code
    from dstack.server.services import file_archives

    archives = await file_archives.archive_blobs(session, run_spec)
    return await asyncio.to_thread(file_archives.merge, code, archives)


async def _repo_code(session: AsyncSession, project_id: str, run_spec: RunSpec) -> bytes:
    if not run_spec.repo_code_hash or not run_spec.repo_id:
        return b""
    result = await session.execute(
        select(CodeModel.blob)
        .join(RepoModel, RepoModel.id == CodeModel.repo_id)
        .where(
            RepoModel.project_id == project_id,
            RepoModel.name == run_spec.repo_id,
            CodeModel.blob_hash == run_spec.repo_code_hash,
        )
    )
    blob = result.scalar_one_or_none()
    if blob is None:
        raise AgentError(f"code {run_spec.repo_code_hash} of repo {run_spec.repo_id} was not uploaded")
    return blob
