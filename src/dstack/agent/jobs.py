"""Job state, persistence and the process lifecycle (start, stop, finish)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import shutil
import signal
import tarfile
import time
from pathlib import Path
from typing import Any

import psutil

from dstack.agent import containers, devenv, devenv_container, mounts, runner, sandbox
from dstack.agent.logs import LogStore
from dstack.agent.models import FINAL_STATES, AgentJobSubmission
from dstack.agent.netns import NETNS_DIR, NetnsAllocation, NetnsError, NetworkIsolation
from dstack.agent.prewarm import with_prewarm_path
from dstack.agent.venvs import SETUP_LOCK, PythonNotFound, VenvFactory, touch_last_used
from dstack.agent.workersite import with_worker_site
from dstack.core.exit_status import describe_exit, signal_name
from dstack.core.notifier import KeyedNotifier
from dstack.core.private import private_dir, write_private

logger = logging.getLogger(__name__)

EOF_AFTER_EXIT_SECONDS = 1.0  # how long leftover children may hold the pipes after the shell exits
EOF_AFTER_KILL_SECONDS = 5.0
SLOW_END_SECONDS = 2.0  # an end reported later than this after the exit is logged
HOST_ADDRESS = "127.0.0.1"
ENV_FILE = "env.json"  # a submitted job's env until it starts (0600)


class JobError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Job:
    """One job: its spec, files under ``jobs/<id>``, state, logs and (while running) its process."""

    def __init__(self, spec: AgentJobSubmission, dir: Path, manager: JobManager) -> None:
        self.spec = spec
        self.dir = dir
        self.manager = manager
        self.state: str = "submitted"
        self.exit_status: int | None = None
        self.message: str | None = None
        self.submitted_at: float = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.pid: int | None = None
        self.pid_create_time: float | None = None
        self.logs = LogStore(dir / "logs.jsonl")
        self.stop_requested: str | None = None  # "terminate" | "abort"
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task[None] | None = None
        self._grace_task: asyncio.Task[None] | None = None
        # Effective network: "isolated" only when asked for and this host can do it.
        self.network: str = "isolated" if spec.network == "isolated" and manager.net.available else "host"
        self.netns: NetnsAllocation | None = None  # while its namespace exists
        self.address: str | None = HOST_ADDRESS if self.network == "host" else None
        self.shared_venv: Path | None = None  # the cached venv it uses (spec.venv_key), once prepared
        # The unprivileged user its process runs as (agent.sandbox), set on submit; None: the agent's.
        self.user: sandbox.JobUser | None = None
        self._python_prefix: Path | None = None  # the interpreter's install, which the job must reach
        # Image jobs: the container's name (found by it on stop and after an agent restart).
        self.container: str | None = containers.container_name(manager.home, spec.job_id) if spec.image else None
        self.runtime: containers.ContainerRuntime | None = None  # the CLI, once prepared
        self._pull_proc: asyncio.subprocess.Process | None = None  # while the image is pulled
        self._kill_task: asyncio.Task[None] | None = None  # an abort's `kill` of the container
        self.binds: list[mounts.Bind] = []  # its volumes' host directories, once prepared

    # -- state -----------------------------------------------------------------------------
    @property
    def repo_dir(self) -> Path:
        return self.dir / "repo"

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def notify(self) -> None:
        """Wake every long-poll waiting on this job."""
        self.manager.changes.notify(self.spec.job_id)

    async def _wait_change(self, timeout: float) -> bool:
        """Until the next notify() (True) or `timeout` (False)."""
        return await self.manager.changes.wait(self.spec.job_id, timeout)

    def set_state(self, state: str, **fields: Any) -> None:
        for key, value in fields.items():
            setattr(self, key, value)
        self.state = state
        if state in FINAL_STATES:
            self.finished_at = self.finished_at or time.time()
            self.logs.close()
            self.env_file.unlink(missing_ok=True)  # stopped before it started
        self.save()
        self.notify()

    def to_dict(self) -> dict[str, Any]:
        return {
            # Credentials and env values stay in memory (env also in env.json until the job starts).
            "spec": self.spec.model_dump(exclude={"registry_auth", "env"}),
            "state": self.state,
            "exit_status": self.exit_status,
            "message": self.message,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "pid": self.pid,
            "pid_create_time": self.pid_create_time,
            "network": self.network,
            "address": self.address,
            "netns": self.netns.to_dict() if self.netns is not None else None,
        }

    def status(self, state: str | None = None) -> dict[str, Any]:
        """What the server stores of the job (the /pull, /watch and submit answers); ``state`` as
        read before the logs it goes with, else the current one."""
        return {
            "state": self.state if state is None else state,
            "exit_status": self.exit_status,
            "message": self.message,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "network": self.network,
            "address": self.address,
        }

    def save(self) -> None:
        """Write state.json atomically so a restarted agent still knows this job."""
        if not self.dir.exists():
            return
        tmp = self.dir / "state.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f)
        os.replace(tmp, self.dir / "state.json")

    @property
    def env_file(self) -> Path:
        return self.dir / ENV_FILE

    def save_env(self) -> None:
        """Keep the env of a job not started yet in a 0600 file, so an agent restarted before the
        start still has it; `start` removes it (from then on the process holds its env)."""
        kept = {k: v for k, v in self.spec.env.items() if k not in self.spec.secret_env}
        if kept:
            write_private(self.env_file, json.dumps(kept))

    # -- long poll -------------------------------------------------------------------------
    async def pull(self, cursor: int, known_state: str | None, wait: float, limit: int, linger: float = 0.0) -> bytes:
        """The JSON body of a /pull answer, once there is news or ``wait`` has passed.

        When the only news is new log records, ``linger`` holds the answer that much longer (or
        until the state changes, or ``limit`` records are there), so a job that keeps printing
        costs its watcher one answer per interval rather than one per line."""
        known = self.state if known_state is None else known_state
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self.logs.last_seq <= cursor and self.state == known and not self.is_final:
            if not await self._wait_change(deadline - loop.time()):
                break
        if linger > 0 and self.logs.last_seq > cursor:
            deadline = loop.time() + linger
            while self.state == known and not self.is_final and self.logs.last_seq - cursor < limit:
                if not await self._wait_change(deadline - loop.time()):
                    break
        state = self.state  # read before the logs: a final state then implies all logs are stored
        records, next_cursor = self.logs.read(cursor, limit)
        head = json.dumps({**self.status(state), "next_cursor": next_cursor}).encode()
        # Records are stored already encoded; splice them in rather than re-serialising.
        return head[:-1] + b', "logs": [' + b",".join(records) + b"]}"

    # -- running ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.state != "submitted":
            return
        self.env_file.unlink(missing_ok=True)
        self.set_state("preparing")
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._run_inner()
        except Exception as e:  # never leave a job hanging in a non-final state
            logger.exception("job %s crashed", self.spec.job_id)
            try:
                await self.release_network()
            except Exception:
                pass
            if not self.is_final:
                self.set_state("failed", message=f"agent error: {e}")

    async def _prepare(self) -> tuple[Path | None, Path]:
        spec = self.spec
        if spec.volumes:
            await self._prepare_volumes()
        if spec.image:
            return await self._prepare_image(spec.image)
        interp = self.manager.venvs.resolve(spec.python)
        self._python_prefix = interp.executable.parent.parent
        user = self.user
        if spec.venv_key:
            # shared with every job of the same key (same python + setup): prepared by earlier runs
            key = spec.venv_key
            if user is not None:
                key = sandbox.shared_venv_key(self.manager.venvs.shared_root / interp.version, key, user)
            try:
                venv_dir = await asyncio.to_thread(self.manager.venvs.shared, interp, key)
                if user is not None:
                    await asyncio.to_thread(sandbox.adopt_venv, venv_dir, user)
            except OSError as e:
                raise JobError(500, f"cannot prepare the shared venv {spec.venv_key!r}: {e}") from e
            self.shared_venv = venv_dir
        else:
            venv_dir = self.dir / "venv"
            await asyncio.to_thread(self.manager.venvs.create, interp, venv_dir)
            if user is not None:
                await asyncio.to_thread(sandbox.give_tree, venv_dir, user)
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        try:
            if user is not None:
                cwd = sandbox.working_dir(self.repo_dir, spec.working_dir, user)
            else:
                cwd = runner.resolve_working_dir(self.repo_dir, spec.working_dir)
                cwd.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JobError(400, f"cannot use working_dir {spec.working_dir!r}: {e}") from e
        return venv_dir, cwd

    async def _prepare_volumes(self) -> None:
        """The volumes' host directories (agent.mounts); a host job needs a mount namespace for them."""
        spec, user = self.spec, self.user
        if not spec.image and user is None and os.geteuid() != 0:
            raise JobError(
                400, "volumes need the agent to run as root (they are bind mounts in the job's own mount namespace)"
            )
        owner = (user.uid, user.gid) if user is not None else None
        try:
            self.binds = await asyncio.to_thread(mounts.resolve, self.manager.home, spec.volumes, owner)
        except mounts.MountError as e:
            raise JobError(400, str(e)) from e

    async def _prepare_image(self, image: str) -> tuple[None, Path]:
        """Find the container CLI and make sure the image is local; the CLI runs in the job dir."""
        rt = await asyncio.to_thread(containers.detect)
        if rt is None:
            raise JobError(
                400, f"containers are not available on this host: {containers.why_unavailable()} (image {image!r})"
            )
        self.runtime = rt
        if rt.kind == "docker" and self.network == "isolated":
            # docker cannot join a namespace it did not make: the job shares the host network
            logger.warning(
                "job %s: docker cannot use the job's network namespace; using the host network", self.spec.job_id
            )
            self.network, self.address = "host", HOST_ADDRESS
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        auth = self.spec.registry_auth
        auth_dir = None
        try:
            if auth is not None:
                auth_dir = containers.write_auth(self.dir / ".registry-auth", image, auth.username, auth.password)
            await containers.ensure_image(rt, image, on_pull=self._note_pull, auth_dir=auth_dir)
        except containers.ContainerError as e:
            raise JobError(400, str(e)) from e
        finally:
            if auth_dir is not None:  # the credentials are needed for the pull only
                shutil.rmtree(auth_dir, ignore_errors=True)
        return None, self.dir

    def _note_pull(self, proc: asyncio.subprocess.Process | None) -> None:
        self._pull_proc = proc

    def _command(self, script: Path, venv_dir: Path | None, prefix: list[str]) -> tuple[list[str], dict[str, str]]:
        """The job's command line and its environment: bash on the host, or the container CLI."""
        spec = self.spec
        if self.runtime is None:
            user = self.user
            pip_cache = self.manager.pip_cache if user is None else user.home / ".cache" / "pip"
            env = runner.job_env(spec.env, venv_dir, spec.gpus, pip_cache)
            if user is not None:
                env = sandbox.user_env(env, spec.env, user)
            if spec.prewarm and self.network == "host" and self.shared_venv is not None:
                # Zygote children live in the host's network namespace: host-network jobs only.
                try:
                    env = with_prewarm_path(env, self.shared_venv, user.uid if user is not None else None)
                except OSError as e:
                    logger.warning("job %s: no warm start: %s", spec.job_id, e)
            if spec.worker_site:
                env = with_worker_site(env)
            argv = runner.job_argv(spec.shell, spec.entrypoint, spec.commands, script)
            agent_code = devenv.with_agent_python(env) if devenv.PORT_ENV in spec.env else None
            if user is not None:  # GPUs: /dev/nvidia* must be usable by other users (0666, the default)
                extra = [p for p in (self._python_prefix, agent_code) if p is not None]
                argv = self.manager.isolation.wrap(argv, user, self.manager.isolation.exposures(extra), self.binds)
            elif self.binds:
                argv = mounts.wrap_plain(argv, self.binds)
            return [*prefix, *argv], env
        job_env = {"PYTHONUNBUFFERED": "1", **spec.env}
        # a dev environment's SSH server settings are for the server beside the container, not the job
        devenv_env = {k: job_env.pop(k) for k in (devenv.PORT_ENV, devenv.KEY_ENV) if k in job_env}
        by_name, by_value = containers.split_env(job_env)
        c = containers.ContainerSpec(
            name=self.container or "",
            job_id=spec.job_id,
            image=spec.image or "",
            code_dir=self.repo_dir,
            workdir=containers.container_workdir(spec.working_dir),
            network=containers.network_arg(NETNS_DIR / self.netns.netns if self.netns is not None else None),
            script=script if (spec.commands or spec.setup) and spec.entrypoint is None else None,
            args=list(spec.commands) if spec.entrypoint is not None else list(spec.args),
            shell=spec.shell,
            entrypoint=shlex.split(spec.entrypoint) if spec.entrypoint is not None else None,
            user=spec.user,
            home_dir=spec.home_dir if "HOME" not in spec.env else None,
            privileged=spec.privileged,
            env_by_name=by_name,
            env_by_value=by_value,
            gpus=list(spec.gpus),
            stop_grace=spec.stop_grace_seconds,
            volumes=mounts.container_args(self.binds),
        )
        env = runner.base_env()
        env.update({k: job_env[k] for k in by_name})
        argv = self.runtime.run_cmd(c)
        if devenv_env:  # its SSH server runs beside the container, sessions inside (agent.devenv_container)
            env.update(devenv_env)
            netns = NETNS_DIR / self.netns.netns if self.netns is not None else None
            argv = devenv_container.wrap(argv, self.runtime, c, netns, env)
        return argv, env

    async def _run_inner(self) -> None:
        spec = self.spec
        try:
            venv_dir, cwd = await self._prepare()
        except (JobError, PythonNotFound) as e:
            if self.stop_requested:  # e.g. a pull ended by the stop
                self.set_state(self._stopped_state(), message="stopped before the process started")
            else:
                self.set_state("failed", message=str(e))
            return
        if self.stop_requested:
            self.set_state(self._stopped_state(), message="stopped before the process started")
            return
        script = self.dir / "job.sh"
        setup_lock = self.shared_venv / SETUP_LOCK if self.shared_venv is not None else None
        runner.write_script(script, spec.setup, spec.commands, setup_lock)
        if self.user is not None:
            os.chown(script, self.user.uid, self.user.gid)
        prefix: list[str] = []
        if self.network == "isolated":
            try:
                self.netns = await asyncio.to_thread(self.manager.net.setup, spec.job_id)
            except (NetnsError, OSError) as e:
                logger.warning(
                    "job %s: cannot create its network namespace, using the host network: %s", spec.job_id, e
                )
                self.network, self.address = "host", HOST_ADDRESS
            else:
                self.address = self.netns.address
                self.save()  # the allocation is on disk before anything runs in it
                prefix = self.manager.net.exec_prefix(self.netns)
                if self.stop_requested:  # stopped while the namespace was being made
                    await self.release_network()
                    self.set_state(self._stopped_state(), message="stopped before the process started")
                    return
        argv, env = self._command(script, venv_dir, prefix)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=str(cwd),
                env=env,
                start_new_session=True,
            )
        except OSError as e:
            await self.release_network()
            self.set_state("failed", message=f"cannot start {os.path.basename(argv[0])}: {e}")
            return
        self.proc = proc
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            create_time = None
        self.set_state("running", started_at=time.time(), pid=proc.pid, pid_create_time=create_time)
        assert proc.stdout is not None and proc.stderr is not None
        pumps = [
            asyncio.create_task(runner.pump(proc.stdout, "stdout", self.logs, self.notify)),
            asyncio.create_task(runner.pump(proc.stderr, "stderr", self.logs, self.notify)),
        ]
        rc = await proc.wait()
        exited = time.monotonic()
        _, pending = await asyncio.wait(pumps, timeout=EOF_AFTER_EXIT_SECONDS)
        if pending:  # children left behind still hold the pipes: end them
            self._signal_group(signal.SIGKILL)
            _, pending = await asyncio.wait(pumps, timeout=EOF_AFTER_KILL_SECONDS)
            for task in pending:
                task.cancel()
        if self._grace_task is not None:
            self._grace_task.cancel()
        if self.shared_venv is not None:  # a long job counts as a use until it ends
            touch_last_used(self.shared_venv)
        exit_status = rc if rc >= 0 else 128 - rc
        if self.container is not None and self.stop_requested == "terminate" and exit_status == 128 + signal.SIGKILL:
            self.message = f"terminated: killed after the {spec.stop_grace_seconds:g} s grace period"
        if self.stop_requested:
            self.set_state(self._stopped_state(), exit_status=exit_status, message=self.message)
        elif rc == 0:
            self.set_state("done", exit_status=0)
        else:
            message = describe_exit(exit_status)
            if signal_name(exit_status):
                # A death by signal also ends the job's log: `dstack logs` then says why it stopped,
                # after whatever the process printed (faulthandler's stacks for a native crash).
                # A plain exit status says it all and leaves the job's own output as it was.
                self.logs.append("stderr", f"dstack: the process {message}\n".encode(), time.time())
            self.set_state("failed", exit_status=exit_status, message=message)
        late = time.monotonic() - exited
        if late > SLOW_END_SECONDS:
            logger.warning("job %s: its end is reported %.1f s after the process exited", spec.job_id, late)
        # The end is reported first, the namespace removed after: its removal waits for a lock
        # that every agent on the host shares, and the server must not wait on other agents'
        # work to learn that this job ended (and start its replacement).
        await self.release_network()

    def _stopped_state(self) -> str:
        return "aborted" if self.stop_requested == "abort" else "terminated"

    def _signal_group(self, sig: int) -> None:
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def stop(self, abort: bool) -> None:
        if self.is_final:
            return
        if abort:
            self.stop_requested = "abort"
        elif self.stop_requested is None:
            self.stop_requested = "terminate"
        if self.state == "submitted":
            self.set_state(self._stopped_state(), message="stopped before start")
            return
        if self.proc is None:  # preparing: _run_inner sees stop_requested before spawning
            if self._pull_proc is not None and self._pull_proc.returncode is None:
                self._pull_proc.kill()
            return
        if self.container is not None:
            self._stop_container(abort)
            return
        if abort:
            self.message = "aborted on request (SIGKILL)"
            self._signal_group(signal.SIGKILL)
        elif self._grace_task is None:
            self.message = "stopped on request (SIGTERM)"
            self._signal_group(signal.SIGTERM)
            self._grace_task = asyncio.create_task(self._kill_after_grace())

    def _stop_container(self, abort: bool) -> None:
        """The CLI signals the container (its process is not in our process group)."""
        assert self.runtime is not None and self.container is not None
        if abort:
            self.message = "aborted on request (SIGKILL)"
            self._kill_task = asyncio.create_task(self._container_control(self.runtime.kill_cmd(self.container)))
        elif self._grace_task is None:
            self.message = "stopped on request (SIGTERM)"
            grace = self.spec.stop_grace_seconds
            self._grace_task = asyncio.create_task(
                self._container_control(self.runtime.stop_cmd(self.container, grace), grace)
            )

    async def _container_control(self, argv: list[str], grace: float = 0) -> None:
        """Run a stop/kill until it takes: right after start the container may not exist yet."""
        while self.proc is not None and self.proc.returncode is None:
            try:
                rc, err = await containers.call(argv, timeout=grace + containers.CONTROL_TIMEOUT)
            except TimeoutError:
                rc, err = -1, "timed out"
            if rc == 0:
                return
            logger.debug("job %s: %s: %s", self.spec.job_id, containers.describe(argv), err)
            await asyncio.sleep(0.2)

    async def _kill_after_grace(self) -> None:
        grace = self.spec.stop_grace_seconds
        await asyncio.sleep(grace)
        if self.proc is not None and self.proc.returncode is None:
            self.message = f"terminated: killed after the {grace:g} s grace period"
            self._signal_group(signal.SIGKILL)

    async def release_network(self) -> None:
        if self.netns is not None:
            await asyncio.to_thread(self.release_network_sync)

    def release_network_sync(self) -> None:
        """Remove the job's namespace and veth pair (kills anything still running in it)."""
        alloc, self.netns = self.netns, None
        if alloc is None:
            return
        try:
            self.manager.net.teardown(alloc)
        except Exception:
            logger.exception("job %s: cannot remove network namespace %s", self.spec.job_id, alloc.netns)
        try:
            self.save()
        except OSError:  # an ended job's directory deleted meanwhile: nothing left to record
            pass

    def kill_now(self) -> None:
        """SIGKILL the process group (agent shutdown, delete); an image job's container goes too."""
        if self._pull_proc is not None and self._pull_proc.returncode is None:
            self._pull_proc.kill()
        if self.proc is not None and self.proc.returncode is None:
            self._signal_group(signal.SIGKILL)
            self.remove_container_sync()

    def remove_container_sync(self) -> None:
        """Remove the job's container, if any (it is not a child of ours: killing the CLI leaves it)."""
        if self.container is None:
            return
        rt = self.runtime or containers.detect()
        if rt is not None:
            containers.call_sync(rt.remove_cmd(self.container))


class JobManager:
    """All jobs of this agent, loaded from and persisted to ``home/jobs``."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.jobs_dir = home / "jobs"
        self.cache_dir = home / "cache"
        self.pip_cache = self.cache_dir / "pip-cache"
        self.jobs: dict[str, Job] = {}
        #: a job's state or logs changed (keyed by job id): wakes its long-polls
        self.changes: KeyedNotifier[str] = KeyedNotifier()
        self.net = NetworkIsolation(home)
        self.venvs = VenvFactory(self.cache_dir)
        self.isolation = sandbox.Isolation(home)  # probed at start (app lifespan)
        private_dir(self.jobs_dir)
        self.pip_cache.mkdir(parents=True, exist_ok=True)

    def load(self) -> None:
        """Read jobs a previous agent left; those it was running are failed (their process is killed)."""
        for state_file in sorted(self.jobs_dir.glob("*/state.json")):
            try:
                data = json.loads(state_file.read_text())
                spec_data = dict(data["spec"])
                env_file = state_file.parent / ENV_FILE
                if data.get("state") == "submitted" and env_file.exists():
                    spec_data["env"] = json.loads(env_file.read_text())
                spec = AgentJobSubmission.model_validate(spec_data)
            except (OSError, ValueError, KeyError) as e:
                logger.warning("skipping unreadable %s: %s", state_file, e)
                continue
            job = Job(spec, state_file.parent, self)
            for key in (
                "state",
                "exit_status",
                "message",
                "submitted_at",
                "started_at",
                "finished_at",
                "pid",
                "pid_create_time",
            ):
                setattr(job, key, data.get(key))
            if data.get("network") in ("host", "isolated"):
                job.network = data["network"]
                job.address = data.get("address")
            if job.state == "submitted" and spec.secret_env:  # its secrets were in memory only
                job.set_state("failed", message="agent restarted")
            if job.state not in FINAL_STATES and job.state != "submitted":
                _kill_orphan(job.pid, job.pid_create_time)
                job.remove_container_sync()  # outlives its CLI: found by name
                job.set_state("failed", message="agent restarted")
            alloc = NetnsAllocation.from_dict(data.get("netns"))
            if alloc is not None:  # a namespace left by a previous agent: nothing runs there now
                job.netns = alloc
                self.net.adopt(alloc)
                job.release_network_sync()
            if "env" in data["spec"] or state_file.stat().st_mode & 0o077:
                job.save()  # an older agent's file: readable by others, env included
            private_dir(job.dir)
            if job.state == "submitted" and not spec.image and self.isolation.available:
                # sent before the restart, started after it: it runs as its project's user too
                job.user = self.isolation.user_for(spec.project_id)
                sandbox.prepare_job_dir(job.dir, job.user)
            self.jobs[spec.job_id] = job
        self.net.cleanup_stale()

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise JobError(404, f"job {job_id!r} not found")
        return job

    def submit(self, spec: AgentJobSubmission) -> Job:
        if spec.job_id in self.jobs:
            raise JobError(409, f"job {spec.job_id!r} already exists")
        job_dir = self.jobs_dir / spec.job_id
        shutil.rmtree(job_dir, ignore_errors=True)  # leftovers of a job deleted mid-way
        private_dir(job_dir)
        (job_dir / "repo").mkdir()
        job = Job(spec, job_dir, self)
        job.save()
        job.save_env()
        if not spec.image and self.isolation.available:  # an image job is isolated by its container
            job.user = self.isolation.user_for(spec.project_id)
            sandbox.prepare_job_dir(job_dir, job.user)  # after the files above (they make it 0700)
        self.jobs[spec.job_id] = job
        return job

    async def put_code(self, job_id: str, archive: Path) -> None:
        job = self.get(job_id)
        if job.state != "submitted":
            raise JobError(409, f"job {job_id!r} is {job.state}; code can only be uploaded before start")
        try:
            await asyncio.to_thread(runner.safe_extract, archive, job.repo_dir)
            if job.user is not None:
                await asyncio.to_thread(sandbox.give_tree, job.repo_dir, job.user)
        except (ValueError, OSError, EOFError, tarfile.TarError) as e:
            raise JobError(400, f"bad code archive: {e}") from e

    async def delete(self, job_id: str) -> None:
        job = self.get(job_id)
        if not job.is_final:
            await job.stop(abort=True)
            if job.task is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(job.task), EOF_AFTER_KILL_SECONDS + 2)
                except TimeoutError:
                    pass
        await job.release_network()
        self.jobs.pop(job_id, None)
        job.logs.close()
        await asyncio.to_thread(shutil.rmtree, job.dir, True)

    def shutdown(self) -> None:
        """Agent is stopping: kill running jobs and record why."""
        for job in self.jobs.values():
            if not job.is_final and job.state != "submitted":
                job.kill_now()
                job.set_state("failed", message="agent stopped")
            job.release_network_sync()
            job.logs.close()


def _kill_orphan(pid: int | None, create_time: float | None) -> None:
    """Kill the process group of a job whose agent died, if that exact process still exists."""
    if not pid:
        return
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.01:
            return  # pid reused by another process
    except psutil.Error:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
