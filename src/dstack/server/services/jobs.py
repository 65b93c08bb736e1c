"""Turning a run configuration into job specs, and job rows into the agent's job submission."""

from dstack.core.models.configurations import BaseRunConfiguration, ServiceConfiguration, TaskConfiguration
from dstack.core.models.runs import JobSpec


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
        commands=conf.job_commands(),
        setup=list(conf.setup),
        env=dict(conf.env),
        working_dir=conf.working_dir,
        python=conf.python,
        image=conf.image,
        ports=job_ports(conf),
        requirements=conf.resources.model_dump(mode="json"),
        max_duration=max_duration,
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
