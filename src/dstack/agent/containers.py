"""Jobs with an ``image``: find a container CLI on this host and build its command lines.

The agent drives the CLI (``podman``, or ``docker`` where that is what works) rather than an
Engine API socket: podman needs no daemon, and an attached ``run`` gives the job's stdout/stderr
as pipes and the container's exit status as the CLI's own, exactly like a host process. Every
container is named after the agent home and the job id, so stop/abort and a restarted agent
find it by name without keeping any id.

Settings (environment of the agent):

- ``DSTACK_CONTAINER_RUNTIME``: ``podman`` / ``docker`` / a path to either; ``none`` turns
  containers off. Unset: podman if it works here, else docker if it works.
- ``DSTACK_CONTAINER_OCI_RUNTIME``: podman's ``--runtime`` (default: ``runc`` where installed,
  since crun cannot set up cgroups on some hosts; ``default`` leaves podman's own choice).
- ``DSTACK_CONTAINER_ULIMITS``: comma-separated ``--ulimit`` values (``""`` passes none).
  Default: the agent's own open-files and processes limits, i.e. what a host job gets; podman's
  built-in defaults exceed the hard limits of restricted hosts and then nothing starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import resource
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dstack.agent.runner import PROXY_ENV

WORKFLOW_DIR = "/workflow"  # where the job's code is mounted, dstack's convention
SCRIPT_PATH = "/dstack/job.sh"  # where the generated setup+commands script is mounted
PROBE_TIMEOUT = 15.0
CONTROL_TIMEOUT = 30.0  # stop/kill/rm calls (stop adds the grace period)
# Variables the CLI (a Go program) itself reads: a job variable like that is passed by value
# (``--env K=V``) so it cannot reconfigure the CLI; all others are passed through by name.
CLI_ENV_PREFIXES = ("CONTAINER", "DOCKER_", "BUILDAH_", "STORAGE_", "XDG_", "LD_", "SSL_CERT_")
CLI_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "TMPDIR",
        "REGISTRY_AUTH_FILE",
        "GOMAXPROCS",
        "GODEBUG",
        "GOGC",
        "GOMEMLIMIT",
        "GOTRACEBACK",
        *PROXY_ENV,
    }
)
# Run the script with bash when the image has it (like host jobs), else with its POSIX sh.
SHELL_WRAPPER = 'if command -v bash >/dev/null 2>&1; then exec bash --noprofile --norc "$0"; fi; exec /bin/sh "$0"'


class ContainerError(Exception):
    """A container CLI call failed; the message carries the CLI's own error text."""


@dataclass(frozen=True)
class ContainerRuntime:
    """One working container CLI and the fixed options every ``run`` gets on this host."""

    kind: str  # "podman" | "docker"
    exe: str
    oci_runtime: str | None = None  # podman --runtime
    ulimits: tuple[str, ...] = ()

    @property
    def global_args(self) -> list[str]:
        """The CLI plus options that go before the subcommand."""
        if self.kind == "podman" and self.oci_runtime:
            return [self.exe, "--runtime", self.oci_runtime]
        return [self.exe]

    # -- images ------------------------------------------------------------------------------
    def image_exists_cmd(self, image: str) -> list[str]:
        if self.kind == "podman":
            return [*self.global_args, "image", "exists", image]
        return [*self.global_args, "image", "inspect", "--format", "{{.Id}}", image]

    def pull_cmd(self, image: str, auth_dir: Path | None = None) -> list[str]:
        """`pull`; with `auth_dir` (written by `write_auth`) the CLI logs in with its credentials."""
        if auth_dir is None:
            return [*self.global_args, "pull", "-q", image]
        if self.kind == "podman":
            return [*self.global_args, "pull", "-q", "--authfile", str(auth_dir / AUTH_FILE), image]
        return [self.exe, "--config", str(auth_dir), *self.global_args[1:], "pull", "-q", image]

    # -- containers --------------------------------------------------------------------------
    def run_cmd(self, c: ContainerSpec) -> list[str]:
        """``run`` attached (so the CLI's pipes are the job's output and its status the job's)."""
        argv = [
            *self.global_args,
            "run",
            "--rm",
            "--name",
            c.name,
            "--init",
            "--label",
            f"dstack.job_id={c.job_id}",
            "--stop-timeout",
            str(int(c.stop_grace)),
        ]
        if self.kind == "podman":
            argv.append("--replace")  # replaces a leftover of this name (from an agent that died)
        for limit in self.ulimits:
            argv += ["--ulimit", limit]
        argv += ["--network", c.network]
        argv += ["-v", f"{c.code_dir}:{WORKFLOW_DIR}", "-w", c.workdir]
        if c.script is not None:
            argv += ["-v", f"{c.script}:{SCRIPT_PATH}:ro"]
        argv += c.volumes
        for key in c.env_by_name:
            argv += ["--env", key]
        for key, value in c.env_by_value.items():
            argv += ["--env", f"{key}={value}"]
        if c.home_dir is not None:
            argv += ["--env", f"HOME={c.home_dir}"]
        if c.user is not None:
            argv += ["--user", c.user]
        if c.privileged:
            argv.append("--privileged")
        argv += self.gpu_args(c.gpus)
        if c.entrypoint:  # dstack's `entrypoint`: its first word replaces the image's, the rest lead the args
            argv += ["--entrypoint", c.entrypoint[0], c.image, *c.entrypoint[1:], *c.args]
        elif c.script is not None and c.shell is not None:
            argv += ["--entrypoint", container_shell(c.shell), c.image, SCRIPT_PATH]
        elif c.script is not None:
            argv += ["--entrypoint", "/bin/sh", c.image, "-c", SHELL_WRAPPER, SCRIPT_PATH]
        else:
            argv += [c.image, *c.args]
        return argv

    def gpu_args(self, gpus: list[int]) -> list[str]:
        """The job's GPUs: CDI device names for podman, ``--gpus device=...`` for docker."""
        if not gpus:
            return []
        if self.kind == "docker":
            # docker parses the value as CSV: a list of devices must be quoted as one field
            return ["--gpus", '"device=' + ",".join(str(g) for g in gpus) + '"', "--shm-size", "1g"]
        argv: list[str] = []
        for g in gpus:
            argv += ["--device", f"nvidia.com/gpu={g}"]
        return argv + ["--shm-size", "1g"]  # NCCL between GPUs needs more than the 64 MB default

    def stop_cmd(self, name: str, grace: float) -> list[str]:
        """SIGTERM, then SIGKILL after ``grace`` seconds (the CLI does both)."""
        return [*self.global_args, "stop", "-t", str(int(round(grace))), name]

    def kill_cmd(self, name: str) -> list[str]:
        return [*self.global_args, "kill", name]

    def remove_cmd(self, name: str) -> list[str]:
        """Remove the container whatever its state (no error when it does not exist)."""
        if self.kind == "podman":
            return [*self.global_args, "rm", "-f", "-i", "-t", "0", name]
        return [*self.global_args, "rm", "-f", name]


@dataclass
class ContainerSpec:
    """What one job's ``run`` needs, already resolved to host paths and container paths."""

    name: str
    job_id: str
    image: str
    code_dir: Path
    workdir: str
    network: str  # "host" or "ns:/run/netns/<name>"
    script: Path | None = None  # None: the image's own entrypoint/cmd runs, with ``args``
    args: list[str] = field(default_factory=list)
    env_by_name: list[str] = field(default_factory=list)  # values come from the CLI's environment
    env_by_value: dict[str, str] = field(default_factory=dict)
    gpus: list[int] = field(default_factory=list)
    stop_grace: float = 10
    volumes: list[str] = field(default_factory=list)  # `-v SRC:DST` arguments (agent.mounts)
    shell: str | None = None  # the configuration's `shell`; None: bash when the image has it, else sh
    entrypoint: list[str] | None = None  # the configuration's `entrypoint`, split into words
    user: str | None = None  # `--user`; None: the image's
    home_dir: str | None = None  # HOME inside the container; None: the user's own
    privileged: bool = False


def container_shell(shell: str) -> str:
    """dstack's `shell` inside an image: `sh` and `bash` are /bin's, anything else an absolute path."""
    return {"sh": "/bin/sh", "bash": "/bin/bash"}.get(shell, shell)


# -- naming and paths --------------------------------------------------------------------------


def container_name(home: Path, job_id: str) -> str:
    """Stable for an agent home and job, and distinct between agents sharing the host."""
    digest = hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:8]
    return f"dstack-{digest}-{job_id}"


def container_workdir(working_dir: str | None) -> str:
    """``working_dir`` inside the container: relative to the mounted code, or absolute as given."""
    if not working_dir:
        return WORKFLOW_DIR
    if working_dir.startswith("/"):
        return os.path.normpath(working_dir)
    return os.path.normpath(f"{WORKFLOW_DIR}/{working_dir}")


def network_arg(netns_path: Path | None) -> str:
    """Join the job's own namespace (so ports/proxy work as for host jobs), else the host's."""
    return f"ns:{netns_path}" if netns_path is not None else "host"


def split_env(env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """(names passed through the CLI's environment, pairs passed on the command line).

    By name keeps values (tokens, keys) out of the process list; only variables the CLI would
    read itself go by value.
    """
    by_name, by_value = [], {}
    for key, value in env.items():
        if key in CLI_ENV_NAMES or key.startswith(CLI_ENV_PREFIXES):
            by_value[key] = value
        else:
            by_name.append(key)
    return by_name, by_value


# -- detection ---------------------------------------------------------------------------------

_lock = threading.Lock()
_cache: dict[tuple[str, str, str], ContainerRuntime | None] = {}


def detect(environ: Mapping[str, str] | None = None) -> ContainerRuntime | None:
    """The working container CLI of this host (probed once per setting), or None."""
    env = os.environ if environ is None else environ
    key = (
        env.get("DSTACK_CONTAINER_RUNTIME", ""),
        env.get("DSTACK_CONTAINER_OCI_RUNTIME", ""),
        env.get("DSTACK_CONTAINER_ULIMITS", "\0"),
    )
    with _lock:
        if key not in _cache:
            _cache[key] = _probe(env)
        return _cache[key]


def why_unavailable(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    choice = env.get("DSTACK_CONTAINER_RUNTIME", "").strip()
    if choice.lower() in ("none", "off", "false", "0"):
        return "disabled by DSTACK_CONTAINER_RUNTIME"
    if choice:
        return f"{choice!r} (DSTACK_CONTAINER_RUNTIME) is not a working container CLI"
    return "neither podman nor docker works here (`podman version` / `docker version` failed or not installed)"


def _probe(env: Mapping[str, str]) -> ContainerRuntime | None:
    choice = env.get("DSTACK_CONTAINER_RUNTIME", "").strip()
    if choice.lower() in ("none", "off", "false", "0"):
        return None
    for name in [choice] if choice else ["podman", "docker"]:
        exe = shutil.which(name)
        if exe is None or not _answers(exe):
            continue
        kind = "docker" if "docker" in os.path.basename(exe) else "podman"
        if kind == "docker":
            return ContainerRuntime("docker", exe)
        return ContainerRuntime("podman", exe, _oci_runtime(env), _ulimits(env))
    return None


def _answers(exe: str) -> bool:
    """``version`` succeeds: the CLI is installed and (docker) its daemon is reachable."""
    try:
        out = subprocess.run([exe, "version"], capture_output=True, timeout=PROBE_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


def _oci_runtime(env: Mapping[str, str]) -> str | None:
    chosen = env.get("DSTACK_CONTAINER_OCI_RUNTIME", "").strip()
    if chosen.lower() == "default":
        return None
    if chosen:
        return chosen
    path = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    return shutil.which("runc", path=path)


def _ulimits(env: Mapping[str, str]) -> tuple[str, ...]:
    if "DSTACK_CONTAINER_ULIMITS" in env:
        return tuple(v.strip() for v in env["DSTACK_CONTAINER_ULIMITS"].split(",") if v.strip())
    return default_ulimits()


def default_ulimits() -> tuple[str, ...]:
    """The agent's own limits (processes capped at pid_max, which no container can exceed)."""
    limits = []
    for name, res, cap in (("nofile", resource.RLIMIT_NOFILE, None), ("nproc", resource.RLIMIT_NPROC, _pid_max())):
        soft, hard = resource.getrlimit(res)
        if hard == resource.RLIM_INFINITY and cap is None:
            continue  # nothing to clamp: the CLI's default fits
        hard = cap if hard == resource.RLIM_INFINITY else min(hard, cap or hard)
        soft = hard if soft == resource.RLIM_INFINITY else min(soft, hard)
        limits.append(f"{name}={soft}:{hard}")
    return tuple(limits)


def _pid_max() -> int | None:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return None


# -- calls -------------------------------------------------------------------------------------


async def call(argv: list[str], timeout: float = CONTROL_TIMEOUT) -> tuple[int, str]:
    """Run one CLI command; (exit status, stderr text). A timeout kills it and counts as failure."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        _kill(proc)
        raise
    return proc.returncode or 0, err.decode(errors="replace").strip()


def call_sync(argv: list[str], timeout: float = CONTROL_TIMEOUT) -> int:
    """Blocking variant for agent start and shutdown (no event loop to use there)."""
    try:
        return subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL).returncode
    except (OSError, subprocess.SubprocessError):
        return -1


AUTH_FILE = "config.json"  # docker reads <dir>/config.json; podman takes the file itself


def registry_host(image: str) -> str:
    """The registry an image reference names (`ghcr.io/org/img:tag` -> ghcr.io; `ubuntu` -> docker.io)."""
    first, _, rest = image.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def write_auth(directory: Path, image: str, username: str, password: str) -> Path:
    """A private (0600) auth file for the image's registry, in the format both CLIs read."""
    import base64

    host = registry_host(image)
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    keys = [host] + (["https://index.docker.io/v1/"] if host == "docker.io" else [])
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / AUTH_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"auths": {k: {"auth": token} for k in keys}}, f)
    return directory


async def ensure_image(
    rt: ContainerRuntime,
    image: str,
    on_pull: Callable[[asyncio.subprocess.Process | None], None] | None = None,
    auth_dir: Path | None = None,
) -> None:
    """Pull ``image`` unless it is already local; ContainerError with the CLI's reason if that fails.

    ``on_pull`` gets the pull process while it runs (and None after), so a stop can end it;
    ``auth_dir`` holds the registry credentials (`write_auth`) when the image is private.
    """
    rc, _ = await call(rt.image_exists_cmd(image))
    if rc == 0:
        return
    proc = await asyncio.create_subprocess_exec(
        *rt.pull_cmd(image, auth_dir),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    if on_pull is not None:
        on_pull(proc)
    try:
        _, err = await proc.communicate()
    except asyncio.CancelledError:
        _kill(proc)
        raise
    finally:
        if on_pull is not None:
            on_pull(None)
    if proc.returncode != 0:
        raise ContainerError(f"cannot pull image {image!r} with {rt.kind}: {pull_error(err.decode(errors='replace'))}")


def pull_error(stderr: str) -> str:
    """The CLI's final error line (podman prints retry warnings before it)."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    text = (errors or lines or [""])[-1]
    return text or "the pull failed with no message"


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass


def describe(argv: list[str]) -> str:
    """A command line as a shell would show it (for messages and logs)."""
    return " ".join(shlex.quote(a) for a in argv)
