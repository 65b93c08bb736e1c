"""The shapes dstack's official client (0.22) validates, made from our wire JSON.

That client sends `X-API-VERSION` with every request and validates answers with its own models
(unknown fields ignored, missing or out-of-enum ones fatal). Our own client and dashboard read
our shapes, so the routers answer in this dialect only for requests that carry the header: runs,
plans and offers gain the fields that client requires (`last_processed_at` per submission,
`job_provisioning_data.instance_type`, `job_spec.image_name`, `requirements.resources`, ...), and
values its enums lack are mapped onto the nearest ones it has (the local backend reads as
`remote`, dstack's name for hosts it did not create).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from dstack.core.models.runs import RunSpec
from dstack.core.tokens import bearer_token

#: the header dstack's official client sends on every request
API_VERSION_HEADER = "x-api-version"
#: our backends as that client's BackendType names them
BACKENDS = {"local": "remote", "ssh": "remote"}
DSTACK_BACKENDS = frozenset(
    "amddevcloud aws azure cloudrift crusoe cudo datacrunch daytona digitalocean dstack gcp hotaisle jarvislabs "
    "kubernetes lambda lium remote nebius oci runpod seeweb tensordock vastai verda vultr slurm".split()
)
#: run termination reasons that client has no name for
RUN_TERMINATION_REASONS = {"max_duration_exceeded": "job_failed"}
RUN_TERMINATION_KNOWN = frozenset(
    "all_jobs_done job_failed retry_limit_exceeded stopped_by_user aborted_by_user server_error gateway_error".split()
)
JOB_TERMINATION_KNOWN = frozenset(
    (
        "failed_to_start_due_to_no_capacity interrupted_by_no_capacity instance_unreachable instance_access_revoked "
        "waiting_instance_limit_exceeded waiting_runner_limit_exceeded terminated_by_user volume_error gateway_error "
        "scaled_down done_by_runner aborted_by_user terminated_by_server inactivity_duration_exceeded "
        "terminated_due_to_utilization_policy container_exited_with_error ports_binding_failed "
        "creating_container_error executor_error max_duration_exceeded log_quota_exceeded"
    ).split()
)
AVAILABILITY_KNOWN = frozenset("unknown available not_available no_quota no_balance idle busy".split())


def wants_dstack_shapes(request: Request) -> bool:
    """The request comes from dstack's official client (or one speaking its dialect)."""
    return API_VERSION_HEADER in request.headers


@dataclass(frozen=True)
class SshEntry:
    """Where dstack's client reaches jobs over SSH (`dstack.server.ssh_entry`): the host it
    reached the API at, and the entry's port."""

    hostname: str
    port: int


def ssh_entry(request: Request) -> SshEntry | None:
    """The SSH entry to advertise to this request's client; None when it is off."""
    entry = getattr(request.app.state, "ssh_entry", None)  # set once it listens
    if entry is None or not entry.port or getattr(request.app.state, "ssh_entry_keys", None) is None:
        return None
    return SshEntry(hostname=request.url.hostname or request.app.state.settings.host, port=entry.port)


def with_user_key(request: Request, user_id: str, spec: RunSpec) -> RunSpec:
    """dstack's client sends no `ssh_key_pub` unless given `--ssh-identity`: the run then gets the
    user's own key (`users/get_my_user` hands it to that user), as dstack's server does."""
    keys = getattr(request.app.state, "ssh_entry_keys", None)
    if spec.ssh_key_pub or keys is None or not wants_dstack_shapes(request):
        return spec
    return spec.model_copy(update={"ssh_key_pub": keys.user_public_key(user_id)})


def user_keys(request: Request, user_id: str) -> dict[str, str]:
    """The user's SSH key pair for dstack's client (`UserSSHKeyManager`); empty when the entry is off."""
    keys = getattr(request.app.state, "ssh_entry_keys", None)
    if keys is None or not wants_dstack_shapes(request):
        return {}
    return {
        "ssh_public_key": keys.user_public_key(user_id),
        "ssh_private_key": keys.user_private_key(user_id),
        # its model of this answer (`UserWithCreds`) requires the token: the one the caller sent
        "creds": {"token": bearer_token(request.headers.get("authorization"), bare=True) or ""},
    }


def backend(name: str | None) -> str:
    if name in DSTACK_BACKENDS:
        return name
    return BACKENDS.get(name or "", "remote")


def _range(value: Any) -> Any:
    """Our ranges are `{min, max}` already; a bare number becomes one."""
    if isinstance(value, dict) or value is None:
        return value
    return {"min": value, "max": value}


def resources(spec: dict[str, Any] | None) -> dict[str, Any]:
    """Our ResourcesSpec JSON as dstack's: `cpu: {arch, count}`, `disk: {size}`."""
    spec = dict(spec or {})
    cpu = spec.get("cpu")
    if not (isinstance(cpu, dict) and "count" in cpu):
        cpu = {"arch": None, "count": _range(cpu) or {"min": 2, "max": None}}
    disk = spec.get("disk")
    if not (isinstance(disk, dict) and "size" in disk):
        disk = {"size": _range(disk) or {"min": 100.0, "max": None}}
    gpu = spec.get("gpu")
    if isinstance(gpu, dict):
        gpu = {k: gpu.get(k) for k in ("vendor", "name", "count", "memory", "total_memory", "compute_capability")}
        gpu["count"] = _range(gpu["count"]) or {"min": 0, "max": None}
        gpu["memory"] = _range(gpu["memory"])
        gpu["total_memory"] = _range(gpu["total_memory"])
    return {
        "cpu": cpu,
        "memory": _range(spec.get("memory")) or {"min": 8.0, "max": None},
        "shm_size": spec.get("shm_size"),
        "gpu": gpu,
        "disk": disk,
    }


def configuration(conf: dict[str, Any]) -> dict[str, Any]:
    """A stored configuration as dstack's models read it (their unknown fields are dropped by them)."""
    out = dict(conf)
    if out.get("type") == "serverless":
        # dstack has no queue endpoints: its client sees the workers' task
        out["type"] = "task"
    if "resources" in out:
        out["resources"] = resources(out["resources"])
    port = out.get("port")
    if isinstance(port, dict) and port.get("local_port") is None:
        out["port"] = {**port, "local_port": 80}
    for key in ("ports",):
        if isinstance(out.get(key), list):
            out[key] = [p for p in out[key] if isinstance(p, (dict, int, str))]
    return out


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "configuration": configuration(spec.get("configuration") or {})}


def instance_type(name: str, res: dict[str, Any] | None, spot: bool = False) -> dict[str, Any]:
    res = res or {}
    gpus = [
        {"name": g.get("name", "gpu"), "memory_mib": g.get("memory_mib", 0), "vendor": g.get("vendor")}
        for g in res.get("gpus") or []
    ]
    return {
        "name": name,
        "resources": {
            "cpus": res.get("cpus", 0),
            "memory_mib": res.get("memory_mib", 0),
            "gpus": gpus,
            "spot": spot,
            "disk": {"size_mib": res.get("disk_mib", 0)},
        },
    }


def offer(o: dict[str, Any]) -> dict[str, Any]:
    availability = o.get("availability", "available")
    return {
        **o,
        "backend": backend(o.get("backend")),
        "instance": instance_type(o.get("instance_name", ""), o.get("resources"), bool(o.get("spot"))),
        "region": o.get("region") or "local",
        "price": o.get("price") or 0.0,
        "availability": availability if availability in AVAILABILITY_KNOWN else "unknown",
        "instance_runtime": "shim",
    }


def app_specs(spec: dict[str, Any], conf: dict[str, Any]) -> list[dict[str, Any]]:
    """The ports dstack's client forwards when it attaches (a task's or dev environment's `ports`;
    a service is reached through the proxy), with the local port the configuration asks for."""
    if conf.get("type") == "service":
        return []
    local: dict[int, int | None] = {}
    for p in conf.get("ports") or []:
        if isinstance(p, dict) and isinstance(p.get("container_port"), int):
            local[p["container_port"]] = p.get("local_port")
    return [
        {"port": port, "map_to_port": local.get(port), "app_name": "app"}
        for port in spec.get("ports") or []
        if isinstance(port, int)
    ]


def job_spec(spec: dict[str, Any], conf: dict[str, Any]) -> dict[str, Any]:
    requirements = dict(spec.get("requirements") or {})
    requirements.update(
        {
            "resources": resources(spec.get("requirements")),
            "max_price": conf.get("max_price"),
            "spot": {"spot": True, "on-demand": False}.get(conf.get("spot_policy") or ""),
        }
    )
    return {
        **spec,
        "image_name": spec.get("image") or "",
        "requirements": requirements,
        "env": spec.get("env") or {},
        "commands": spec.get("commands") or [],
        "app_specs": spec.get("app_specs") or app_specs(spec, conf),
    }


def provisioning_data(
    jpd: dict[str, Any] | None, job_id: str | None = None, entry: SshEntry | None = None
) -> dict[str, Any] | None:
    if jpd is None:
        return None
    # with the SSH entry on, dstack's client jumps through it as the job's id ("dockerized": a
    # second SSH hop to the job); without it, there is no SSH to offer
    reach: dict[str, Any] = {"username": "root", "ssh_port": None, "dockerized": False}
    if entry is not None and job_id:
        reach = {"hostname": entry.hostname, "username": job_id, "ssh_port": entry.port, "dockerized": True}
    return {
        **jpd,
        "backend": backend(jpd.get("backend")),
        "instance_type": instance_type(jpd.get("instance_name", ""), jpd.get("resources")),
        "instance_id": jpd.get("instance_id", ""),
        "region": jpd.get("region") or "local",
        "price": jpd.get("price") or 0.0,
        "ssh_proxy": None,
        **reach,
    }


def submission(sub: dict[str, Any], run_processed_at: str | None, entry: SshEntry | None = None) -> dict[str, Any]:
    reason = sub.get("termination_reason")
    return {
        **sub,
        "last_processed_at": sub.get("finished_at") or run_processed_at or sub.get("submitted_at"),
        "status_message": sub.get("status"),
        "deployment_num": 0,
        "termination_reason": reason if reason is None or reason in JOB_TERMINATION_KNOWN else "executor_error",
        "job_provisioning_data": provisioning_data(sub.get("job_provisioning_data"), sub.get("id"), entry),
        "job_runtime_data": None,
    }


def run(r: dict[str, Any], entry: SshEntry | None = None) -> dict[str, Any]:
    """Our Run JSON as dstack's `Run`; `entry`: the SSH entry to attach through, if on."""
    conf = (r.get("run_spec") or {}).get("configuration") or {}
    jobs = [
        {
            **job,
            "job_spec": job_spec(job.get("job_spec") or {}, conf),
            "job_submissions": [
                submission(s, r.get("last_processed_at"), entry) for s in job.get("job_submissions") or []
            ],
        }
        for job in r.get("jobs") or []
    ]
    latest = None
    for job in jobs:
        if job["job_submissions"]:
            latest = job["job_submissions"][-1]
            break
    reason = r.get("termination_reason")
    if reason is not None and reason not in RUN_TERMINATION_KNOWN:
        reason = RUN_TERMINATION_REASONS.get(reason, "server_error")
    service = r.get("service")
    if isinstance(service, dict):
        service = {"url": service.get("url"), "model": service.get("model"), "options": {}}
    return {
        **r,
        "run_spec": run_spec(r.get("run_spec") or {}),
        "jobs": jobs,
        "latest_job_submission": latest,
        "status_message": r.get("status"),
        "termination_reason": reason,
        "service": service,
        "deployment_num": 0,
        "deleted": False,
        "fleet": None,
    }


def plan(p: dict[str, Any]) -> dict[str, Any]:
    """Our RunPlan JSON as dstack's."""
    spec = run_spec(p.get("run_spec") or {})
    conf = (p.get("run_spec") or {}).get("configuration") or {}
    current = p.get("current_resource")
    return {
        **p,
        "run_spec": spec,
        "effective_run_spec": spec,
        "current_resource": run(current) if current else None,
        "job_plans": [
            {
                **jp,
                "job_spec": job_spec(jp.get("job_spec") or {}, conf),
                "offers": [offer(o) for o in jp.get("offers") or []],
            }
            for jp in p.get("job_plans") or []
        ],
    }


#: what an offers-only plan keeps of the placeholder configuration `dstack offer` sends
OFFER_FIELDS = ("resources", "backends", "regions", "spot_policy", "max_price")


def offers_only_spec(spec: RunSpec) -> RunSpec:
    """`dstack offer` asks for a plan of a placeholder task (`image: scratch`, `user: root`) that
    is never run: keep only what selects offers, so the placeholder's settings are not refused."""
    conf = spec.configuration
    kept: dict[str, Any] = {k: conf[k] for k in OFFER_FIELDS if conf.get(k) is not None}
    return spec.model_copy(update={"configuration": {"type": "task", "commands": [":"], **kept}})


#: profile keys that describe the profile itself, not the run
PROFILE_META = ("name", "default")


def fold_profile(spec: RunSpec) -> RunSpec:
    """dstack's client sends the profile (`.dstack/profiles.yml`, `--profile`) beside the
    configuration; its settings apply where the configuration leaves a field unset, as in dstack.
    Folded in, they are validated (and refused when not supported) like the configuration's own."""
    profile = spec.profile or {}
    settings = {k: v for k, v in profile.items() if k not in PROFILE_META and v is not None}
    conf = dict(spec.configuration)
    for key, value in settings.items():
        if conf.get(key) is None:
            conf[key] = value
    return spec.model_copy(update={"configuration": conf, "profile": None})
