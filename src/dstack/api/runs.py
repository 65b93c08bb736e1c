"""Runs as the Python API shows them: submit, plan/apply (both generations), list, follow, stop."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dstack.core.models.runs import Job, RunPlan, RunSpec, RunStatus, RunTerminationReason
from dstack.core.models.runs import Run as RunWire

if TYPE_CHECKING:
    from dstack.api.client import Client
    from dstack.api.ports import PortForwarder
    from dstack.core.models.configurations import BaseRunConfiguration
    from dstack.core.models.resources import ResourcesSpec


class Run:
    """A handle on one run. `refresh()` re-reads it; `logs()` follows it; `stop()` ends it."""

    def __init__(self, client: Client, wire: RunWire) -> None:
        self._client = client
        self._run = wire
        self._forwarder: PortForwarder | None = None

    # --- properties -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._run.run_name

    @property
    def status(self) -> RunStatus:
        return self._run.status

    @property
    def error(self) -> str | None:
        return self._run.error

    @property
    def termination_reason(self) -> RunTerminationReason | None:
        return self._run.termination_reason

    @property
    def submitted_at(self):
        return self._run.submitted_at

    @property
    def jobs(self) -> list[Job]:
        return self._run.jobs

    @property
    def run_spec(self) -> RunSpec:
        return self._run.run_spec

    @property
    def service_url(self) -> str | None:
        return self._run.service.url if self._run.service else None

    @property
    def model_base_url(self) -> str | None:
        """For services with a model: the OpenAI-compatible base URL (`openai.OpenAI(base_url=...)`)."""
        service = self._run.service
        return service.model.base_url if service and service.model else None

    def _job_address(self) -> str:
        """Where the first job's ports are reachable from here (its network namespace, or the host)."""
        for job in self._run.jobs:
            jpd = job.job_submissions[-1].job_provisioning_data
            if jpd:
                return jpd.address or jpd.hostname or "127.0.0.1"
        return "127.0.0.1"

    def _on_fleet_host(self) -> bool:
        for job in self._run.jobs:
            jpd = job.job_submissions[-1].job_provisioning_data
            if jpd:
                return jpd.backend == "ssh"
        return False

    @property
    def endpoint_id(self) -> str | None:
        """For serverless runs: the id in `/v2/{endpoint_id}/...`."""
        return self._run.extra.get("endpoint_id")

    @property
    def endpoint_url(self) -> str | None:
        """For serverless runs: the RunPod-style base URL (`.../v2/{endpoint_id}`)."""
        return self._run.extra.get("endpoint_url")

    @property
    def hostname(self) -> str | None:
        for job in self._run.jobs:
            jpd = job.job_submissions[-1].job_provisioning_data
            if jpd:
                return jpd.hostname
        return None

    def __repr__(self) -> str:
        return f"<Run '{self.name}' {self.status.value}>"

    # --- actions --------------------------------------------------------------------------
    def refresh(self) -> Run:
        data = self._client.api.post(f"/api/project/{self._client.project}/runs/get", {"run_name": self.name})
        self._run = RunWire.model_validate(data)
        return self

    def stop(self, abort: bool = False) -> None:
        self._client.api.post(
            f"/api/project/{self._client.project}/runs/stop", {"runs_names": [self.name], "abort": abort}
        )

    def logs(
        self, start_time=None, diagnose: bool = False, replica_num: int = 0, job_num: int = 0, follow: bool = True
    ) -> Iterator[bytes]:
        """The job's output as bytes, in order; with `follow`, until the run ends."""
        cursor = 0
        while True:
            resp = self._client.api.post(
                f"/api/project/{self._client.project}/logs/poll",
                {
                    "run_name": self.name,
                    "job_num": job_num,
                    "replica_num": replica_num,
                    "start_after": cursor,
                    "limit": 1000,
                    "wait": 20 if follow else 0,
                },
                timeout=60,
            )
            for record in resp["logs"]:
                yield base64.b64decode(record["message"])
            cursor = resp.get("cursor", resp["next_token"])  # next_token is null on a last page
            if resp["logs"]:
                continue
            if resp["finished"] or not follow:
                return

    def wait(
        self, statuses: tuple[RunStatus, ...] | None = None, timeout: float | None = None, poll: float = 0.2
    ) -> Run:
        """Block until the run reaches one of `statuses` (default: any finished status)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.refresh()
            if (statuses and self.status in statuses) or self.status.is_finished():
                return self
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.name} is still {self.status.value} after {timeout}s")
            time.sleep(poll)

    def attach(
        self,
        ssh_identity_file: str | None = None,
        bind_address: str = "127.0.0.1",
        ports_overrides: list | None = None,
        timeout: float | None = None,
    ) -> bool:
        """Wait until the run is running, then forward its ports to this machine.

        Returns False when the run ended before it started.
        """
        self.wait(statuses=(RunStatus.RUNNING,), timeout=timeout)
        if self.status != RunStatus.RUNNING:
            return False
        from dstack.api.ports import PortForwarder, ports_to_forward

        address = self._job_address()
        mappings = ports_to_forward(self._run, ports_overrides, address)
        if mappings and self._forwarder is None and self._on_fleet_host():
            # a fleet host's job network is not reachable from here: through the server's tunnel
            from dstack.api.tunnel import TunnelForwarder

            api = self._client.api
            tunnels = TunnelForwarder(api.base_url, api.token, self._client.project, self.name)
            tunnels.start(ports_to_forward(self._run, ports_overrides, "tunnel"), bind_address)
            self._forwarder = tunnels  # type: ignore[assignment]
        if mappings and self._forwarder is None:
            self._forwarder = PortForwarder(address, mappings, bind_address)
            self._forwarder.start()
        return True

    def detach(self) -> None:
        if self._forwarder is not None:
            self._forwarder.stop()
            self._forwarder = None

    @property
    def ports(self) -> dict[int, int]:
        """Local port → job port for what `attach()` forwards."""
        return dict(self._forwarder.mappings) if self._forwarder else {}


class RunCollection:
    """`client.runs`."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _path(self, op: str) -> str:
        return f"/api/project/{self._client.project}/runs/{op}"

    # --- current style --------------------------------------------------------------------
    def get_run_plan(
        self,
        configuration: BaseRunConfiguration | dict,
        repo=None,
        configuration_path: str | None = None,
        run_name: str | None = None,
        resources: ResourcesSpec | None = None,
        repo_dir: str | os.PathLike | None = None,
        **_: Any,
    ) -> RunPlan:
        conf = _configuration(configuration, resources, run_name)
        spec = RunSpec(
            run_name=run_name or conf.name,
            configuration_path=configuration_path,
            configuration=conf.model_dump(mode="json"),
            working_dir=conf.working_dir,
        )
        if conf.type == "dev-environment":  # its SSH server accepts the user's key (api/ssh.py)
            from dstack.api.ssh import public_key

            spec.ssh_key_pub = public_key()
        repo_dir = repo_dir if repo_dir is not None else (repo if isinstance(repo, (str, os.PathLike)) else None)
        if conf.files and repo_dir is None:
            from dstack.core.errors import DstackError

            raise DstackError("files are uploaded with the run's code: give repo_dir (the directory to upload)")
        if repo_dir is not None:
            # `files`: local paths relative to the configuration file's directory (its path is
            # relative to repo_dir, as the CLI gives it, or absolute), else to repo_dir
            base = Path(repo_dir) / Path(configuration_path).parent if configuration_path else Path(repo_dir)
            files = [(base / Path(f.local_path).expanduser(), f.path) for f in conf.files]
            spec.repo_id, spec.repo_code_hash = self._client.repos.upload(repo_dir, files=files)
            spec.files_in_code = bool(files)
        plan = RunPlan.model_validate(
            self._client.api.post(self._path("get_plan"), {"run_spec": spec.model_dump(mode="json")})
        )
        # The server's answer hides credentials (`***`); applying the plan sends ours again.
        plan.run_spec.configuration = spec.configuration
        plan.run_spec.ssh_key_pub = spec.ssh_key_pub
        return plan

    def apply_plan(self, run_plan: RunPlan, repo=None, reserve_ports: bool = True, force: bool = False) -> Run:
        data = self._client.api.post(self._path("apply"), {"plan": run_plan.model_dump(mode="json"), "force": force})
        return Run(self._client, RunWire.model_validate(data))

    def apply_configuration(
        self,
        configuration: BaseRunConfiguration | dict,
        repo=None,
        configuration_path: str | None = None,
        run_name: str | None = None,
        resources: ResourcesSpec | None = None,
        repo_dir=None,
        force: bool = False,
        **kw: Any,
    ) -> Run:
        plan = self.get_run_plan(
            configuration,
            repo=repo,
            configuration_path=configuration_path,
            run_name=run_name,
            resources=resources,
            repo_dir=repo_dir,
        )
        return self.apply_plan(plan, force=force)

    # --- 0.15 style -----------------------------------------------------------------------
    def get_plan(
        self, configuration, repo=None, run_name: str | None = None, resources: ResourcesSpec | None = None, **kw: Any
    ) -> RunPlan:
        return self.get_run_plan(configuration, repo=repo, run_name=run_name, resources=resources, **kw)

    def exec_plan(self, run_plan: RunPlan, repo=None, reserve_ports: bool = True) -> Run:
        return self.apply_plan(run_plan, repo=repo, reserve_ports=reserve_ports)

    # --- simple ---------------------------------------------------------------------------
    def submit(
        self,
        configuration,
        run_name: str | None = None,
        resources: ResourcesSpec | None = None,
        repo=None,
        configuration_path: str | None = None,
        reserve_ports: bool = True,
        repo_dir=None,
        **kw: Any,
    ) -> Run:
        """Plan and start a run in one call; `run_name` is random when not given."""
        plan = self.get_run_plan(
            configuration,
            repo=repo,
            configuration_path=configuration_path,
            run_name=run_name,
            resources=resources,
            repo_dir=repo_dir,
        )
        job_plan = plan.job_plans[0] if plan.job_plans else None
        if job_plan is not None and not job_plan.offers:
            from dstack.core.errors import ServerClientError

            raise ServerClientError(job_plan.no_offers_reason or "no offers", code="no_offers")
        return self.apply_plan(plan)

    def list(self, all: bool = False, limit: int | None = None) -> list[Run]:
        """All runs (newest first) with `all`; else the active ones plus the latest few."""
        from dstack.api.listing import list_runs_json

        return [
            Run(self._client, RunWire.model_validate(d)) for d in list_runs_json(self._client, all=all, limit=limit)
        ]

    def get(self, run_name: str) -> Run | None:
        from dstack.core.errors import ServerClientError

        try:
            return Run(
                self._client, RunWire.model_validate(self._client.api.post(self._path("get"), {"run_name": run_name}))
            )
        except ServerClientError as e:
            if e.status == 404:
                return None
            raise


def _configuration(configuration, resources: ResourcesSpec | None, run_name: str | None) -> BaseRunConfiguration:
    from dstack.core.models.configurations import parse_run_configuration

    conf = parse_run_configuration(configuration) if isinstance(configuration, dict) else configuration
    update: dict[str, Any] = {}
    if resources is not None:
        update["resources"] = resources
    if update:
        conf = conf.model_copy(update=update)
    return conf


def repo_id_for(path: Path) -> str:
    path = path.resolve()
    return f"{path.name or 'root'}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
