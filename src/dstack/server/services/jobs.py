"""Turning a run configuration into job specs, and job rows into the agent's job submission."""

import asyncssh

from dstack.agent import devenv_container
from dstack.core.models.configurations import (
    DEFAULT_HOME_DIR,
    BaseRunConfiguration,
    DevEnvironmentConfiguration,
    ServiceConfiguration,
    TaskConfiguration,
)
from dstack.core.models.runs import JobSpec
from dstack.server.errors import Forbidden, InvalidRequest

#: what a dev environment's job runs after its `init`: the SSH server of agent/devenv.py, with the
#: agent's own Python and code (the agent names them in the job's environment), in the job's environment;
#: the path goes on sys.path of this process only, never into the sessions' PYTHONPATH
DEVENV_COMMAND = (
    'exec "${DSTACK_AGENT_PYTHON:-python3}" -c '
    "'import sys; sys.path.insert(0, sys.argv[1]); from dstack.agent.devenv import main; sys.exit(main([]))' "
    '"${DSTACK_AGENT_PATH:-.}"'
)


def job_commands(conf: BaseRunConfiguration) -> list[str]:
    if isinstance(conf, DevEnvironmentConfiguration):
        # with an image, the SSH server runs beside the container (agent/devenv_container.py):
        # the container says when `init` is done and stays up
        return [*conf.init, devenv_container.KEEPALIVE if conf.image else DEVENV_COMMAND]
    return conf.job_commands()


def nodes_count(conf: BaseRunConfiguration) -> int:
    return conf.nodes if isinstance(conf, TaskConfiguration) else 1


def job_ports(conf: BaseRunConfiguration) -> list[int]:
    if isinstance(conf, ServiceConfiguration) and conf.port is not None:
        return [conf.port.container_port]
    engine = getattr(conf, "engine", None)
    if engine is not None and not getattr(conf, "ports", None):
        return [engine.port]
    ports = getattr(conf, "ports", None) or []
    return [p.container_port for p in ports]


def build_job_spec(run_name: str, conf: BaseRunConfiguration, replica_num: int, job_num: int) -> JobSpec:
    max_duration = conf.max_duration if isinstance(conf.max_duration, int) else None
    return JobSpec(
        job_num=job_num,
        replica_num=replica_num,
        job_name=f"{run_name}-{job_num}-{replica_num}",
        commands=job_commands(conf),
        setup=list(conf.setup),
        env=dict(conf.env),
        working_dir=conf.working_dir,
        python=conf.python,
        image=conf.image,
        shell=conf.shell,
        entrypoint=conf.entrypoint,
        user=conf.user,
        home_dir=None if conf.home_dir == DEFAULT_HOME_DIR else conf.home_dir,
        privileged=conf.privileged,
        ports=job_ports(conf),
        requirements=conf.resources.model_dump(mode="json"),
        max_duration=max_duration,
        stop_grace_seconds=conf.stop_duration if isinstance(conf.stop_duration, int) else 10,
        engine=getattr(conf, "engine", None) is not None,
    )


def dstack_env(run_name: str, run_id: str, spec: JobSpec, nodes: int, gpus: list[int], hostname: str) -> dict[str, str]:
    """The DSTACK_* variables every job sees."""
    return {
        "DSTACK_RUN_NAME": run_name,
        "DSTACK_RUN_ID": run_id,
        "DSTACK_JOB_NUM": str(spec.job_num),
        "DSTACK_REPLICA_NUM": str(spec.replica_num),
        "DSTACK_NODES_NUM": str(nodes),
        "DSTACK_NODE_RANK": str(spec.job_num),
        "DSTACK_MASTER_NODE_IP": hostname,
        "DSTACK_NODES_IPS": hostname,
        "DSTACK_GPUS_NUM": str(len(gpus) * nodes),
        "DSTACK_GPUS_PER_NODE": str(len(gpus)),
    }


def check_privileged(conf: BaseRunConfiguration, global_role: str) -> None:
    """A privileged container holds the host's root powers (devices, kernel settings, every file),
    so only a global admin may run one: for anyone else it is refused at submission."""
    if conf.privileged and global_role != "admin":
        raise Forbidden(
            "privileged: true is for global admins only (a privileged container has the host's root powers)"
        )


def check_ssh_key(conf: BaseRunConfiguration, ssh_key_pub: str | None) -> None:
    """A dev environment needs the user's public SSH key (`ssh_key_pub`, one OpenSSH line): its
    SSH server accepts that key only. Refused here, at submission, rather than as a failed job."""
    if not isinstance(conf, DevEnvironmentConfiguration):
        return
    if not ssh_key_pub:
        raise InvalidRequest("a dev-environment needs ssh_key_pub (the user's public SSH key)", fields=["ssh_key_pub"])
    try:
        asyncssh.import_public_key(ssh_key_pub.strip())
    except (asyncssh.KeyImportError, ValueError) as e:
        raise InvalidRequest(f"ssh_key_pub is not an OpenSSH public key: {e}", fields=["ssh_key_pub"]) from e
