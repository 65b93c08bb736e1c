"""Jobs of different projects run as different unprivileged users and see only their own files.

Where the agent runs as root on Linux (and ``DSTACK_AGENT_NO_ISOLATION`` is not set), a job that
runs on the host (no ``image``) is started through ``unshare --mount`` and a small ``sh`` script
that, in the job's own mount namespace and still as root:

- mounts a fresh ``/proc`` with ``hidepid=2``: the job sees only processes of its own user;
- covers the agent's home, the agent user's ``$HOME`` (the server's ``~/.dstack``), ``DSTACK_HOME``
  and every directory other users may not enter on the way to what the job needs with an empty
  tmpfs, then bind-mounts back, at the same paths, only what the job needs: the agent's
  ``jobs``/``cache``/``users`` directories (whose entries are owned by, and private to, the user
  they belong to), the chosen Python's prefix, the agent's own Python (the built-in engine runs
  with it) and the ``dstack`` package;
- becomes that user with ``setpriv`` (no supplementary groups, ``no_new_privs``) and execs the job.

Every exec keeps the pid, so the agent tracks, signals and reaps the job as before. There is no
PID namespace: a serverless worker's warm zygote (agent.prewarm) outlives the job that started it
and forks workers for later jobs of the same user, which a namespace would kill with its first job.

Jobs of one project share one user (``project_id`` in the submission; jobs sent without one share
the user of "default"): uids from ``UID_BASE`` on, without passwd entries, recorded in
``<home>/users.json`` so a project keeps its uid (and its files) across agent restarts, and
allocated from a host-wide table (``Isolation.host_table``) so two agents on one host never share a uid. The user's
private home is ``<home>/users/<uid>`` (0700). GPUs stay usable: ``/dev/nvidia*`` must be readable
and writable by other users (the driver's default, 0666).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from dstack.agent.capability import HostCapability, find_tool
from dstack.agent.mounts import Bind, stash_lines, target_lines

logger = logging.getLogger(__name__)

UID_BASE = 200000
# Which uid each (agent home, project) has, for every agent on this host (survives reboots);
# DSTACK_AGENT_UID_TABLE moves it (read when an agent builds its Isolation, not at import).
DEFAULT_HOST_TABLE = Path("/var/lib/dstack-agent/uids.json")
STASH = Path("/run/dstack-agent/sandbox")  # mounted over (as a 0700 tmpfs) inside each job's namespace
# Never covered, even when one is a user's $HOME: the job needs what is in them.
SYSTEM_DIRS = frozenset(
    map(
        Path,
        [
            "/",
            "/usr",
            "/bin",
            "/sbin",
            "/lib",
            "/lib64",
            "/etc",
            "/tmp",
            "/var",
            "/opt",
            "/run",
            "/dev",
            "/proc",
            "/sys",
            "/home",
            "/srv",
            "/mnt",
        ],
    )
)
PROBE_TIMEOUT = 15.0


@dataclass(frozen=True)
class JobUser:
    """The unprivileged user a project's jobs run as."""

    uid: int
    gid: int
    home: Path

    @property
    def name(self) -> str:  # for USER/LOGNAME: the uid has no passwd entry
        return f"dstack-{self.uid}"


class Isolation(HostCapability):
    """Decides whether jobs can be isolated here, gives each project its user, builds the wrapper."""

    disable_env = "DSTACK_AGENT_NO_ISOLATION"
    what = "job isolation"
    not_root_reason = "the agent does not run as root (jobs run as the agent's user)"

    def __init__(self, home: Path) -> None:
        super().__init__()
        self.home = Path(home).resolve()
        self.users_dir = self.home / "users"
        self._map_file = self.home / "users.json"
        self._lock = threading.Lock()
        self._tools = {name: find_tool(name) for name in ("unshare", "setpriv", "mount", "mkdir")}
        self.host_table = Path(os.environ.get("DSTACK_AGENT_UID_TABLE") or DEFAULT_HOST_TABLE)

    # -- capability ------------------------------------------------------------------------
    def _try(self) -> str:
        """util-linux: run ``id -u`` through the wrapper once."""
        missing = [n for n, p in self._tools.items() if p is None]
        if missing:
            return f"{', '.join(missing)} not found (util-linux)"
        try:
            STASH.mkdir(mode=0o700, parents=True, exist_ok=True)
            user = JobUser(UID_BASE - 1, UID_BASE - 1, Path("/"))
            out = subprocess.run(
                self.wrap(["id", "-u"], user, []), capture_output=True, text=True, timeout=PROBE_TIMEOUT, cwd="/"
            )
        except (OSError, subprocess.SubprocessError) as e:
            return f"the sandbox does not work here: {e}"
        if out.returncode == 0 and out.stdout.strip() == str(user.uid):
            return ""
        return f"the sandbox does not work here: {(out.stderr or out.stdout).strip()[-300:]}"

    def _on_available(self) -> None:
        for d in (self.home / "jobs", self.home / "cache", self.users_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o711)  # users enter their own entries; nobody lists them

    # -- users -----------------------------------------------------------------------------
    def user_for(self, project: str | None) -> JobUser:
        """The project's user (allocated and recorded on first use), its home ready."""
        key = project or "default"
        with self._lock:
            table = _read_table(self._map_file)
            uid = table.get(key)
            if not isinstance(uid, int):
                uid = self._allocate(key)
                table[key] = uid
                _write_table(self._map_file, table)
        user = JobUser(uid, uid, self.users_dir / str(uid))
        self.make_private(user.home, user)
        self.make_private(user.home / ".cache", user)
        return user

    def _allocate(self, key: str) -> int:
        """A uid no other project of any agent on this host has: the host-wide table (under a
        lock) records each (agent home, project)."""
        host_key = f"{self.home}\n{key}"
        self.host_table.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.host_table.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            table = _read_table(self.host_table)
            uid = table.get(host_key)
            if not isinstance(uid, int):
                # Entries of agent homes that are gone are dropped; their uids are not given again
                # ("_next" only grows), so a new project never inherits files an old one left.
                table = {k: v for k, v in table.items() if k == "_next" or Path(k.split("\n")[0]).exists()}
                taken = {v for v in table.values() if isinstance(v, int)}
                taken |= {v for v in _read_table(self._map_file).values() if isinstance(v, int)}
                uid = max(UID_BASE, int(table.get("_next", UID_BASE)))
                while uid in taken or _has_passwd_entry(uid):
                    uid += 1
                table[host_key], table["_next"] = uid, uid + 1
                _write_table(self.host_table, table)
            return uid
        finally:
            os.close(fd)  # releases the flock

    def make_private(self, path: Path, user: JobUser) -> None:
        """``path`` (created if missing) as a directory only ``user`` may enter."""
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, user.uid, user.gid, follow_symlinks=False)
        os.chmod(path, 0o700)

    # -- the wrapper -----------------------------------------------------------------------
    def exposures(self, extra: list[Path]) -> list[Path]:
        """What a job may reach: the agent's per-user directories, the agent's own Python and the
        ``dstack`` package (engines, the prewarm starter and the worker site run from them)."""
        import dstack

        paths = [
            self.home / "jobs",
            self.home / "cache",
            self.users_dir,
            Path(sys.prefix),
            Path(sys.base_prefix),
            Path(dstack.__file__).parent,
            *extra,
        ]
        return paths

    def hidden_roots(self) -> list[Path]:
        """Covered however their modes are: the agent's home and the homes of the server."""
        found = [self.home, Path.home()]
        for var in ("DSTACK_HOME", "DSTACK_SERVER_DIR"):
            if os.environ.get(var):
                found.append(Path(os.environ[var]).expanduser())
        return found

    def wrap(self, argv: list[str], user: JobUser, exposures: list[Path], binds: list[Bind] | None = None) -> list[str]:
        """``argv`` run as ``user`` in its own mount namespace (see the module docstring), with the
        job's volumes (``binds``) mounted last."""
        script = _sandbox_script(
            self._tools,
            user,
            _real_dirs(exposures),
            _real_dirs(self.hidden_roots()),
            private_proc=_proc_mounts_are_private(),
            binds=binds or [],
        )
        assert self._tools["unshare"] is not None
        return [
            self._tools["unshare"],
            "--mount",
            "--propagation",
            "private",
            "--",
            "/bin/sh",
            "-c",
            script,
            "dstack-sandbox",
            *argv,
        ]


def _read_table(path: Path) -> dict[str, int]:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def _write_table(path: Path, table: dict[str, int]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(table, f)
    os.replace(tmp, path)


def _has_passwd_entry(uid: int) -> bool:
    import pwd

    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def _real_dirs(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        try:
            real = Path(os.path.realpath(p))
        except OSError:
            continue
        if real.is_dir() and real not in out:
            out.append(real)
    return out


def _closed_ancestor(path: Path) -> Path | None:
    """The outermost directory on the way to ``path`` (itself included) that others may not enter."""
    for d in [*reversed(path.parents), path]:
        try:
            if not os.stat(d).st_mode & 0o001:
                return d
        except OSError:
            return None
    return None


def _covers(root: Path, path: Path) -> bool:
    return path == root or root in path.parents


def _proc_mounts_are_private() -> bool:
    """Linux 5.8+: each procfs mount has its own options. Before, ``hidepid`` on a new mount
    would change the host's /proc too, so jobs then keep the plain /proc (other users' env and
    files stay unreadable to them; their command lines do not)."""
    release = os.uname().release
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


def _sandbox_script(
    tools: dict[str, str | None],
    user: JobUser,
    exposures: list[Path],
    hidden: list[Path],
    private_proc: bool = True,
    binds: list[Bind] | None = None,
) -> str:
    """The root part of the wrapper: private /proc, covered directories, then ``setpriv``."""
    # Exposures nested in another exposure come back with it.
    exposures = [e for e in exposures if not any(o != e and _covers(o, e) for o in exposures)]
    roots = set(h for h in hidden if h not in SYSTEM_DIRS)
    for e in exposures:
        closed = _closed_ancestor(e)
        if closed is not None and closed not in SYSTEM_DIRS:
            roots.add(closed)
    # Outermost first; a root inside an exposure is covered after that exposure is back.
    ordered = sorted(roots, key=lambda p: len(p.parts))
    q = shlex.quote
    mount, mkdir = q(tools["mount"] or "mount"), q(tools["mkdir"] or "mkdir")
    lines = ["set -e", "umask 022"]
    if private_proc:
        lines.append(f"{mount} -t proc -o nosuid,nodev,noexec,hidepid=2 proc /proc")
    lines.append(f"{mount} -t tmpfs -o mode=0700,size=64k dstack-stash {q(str(STASH))}")
    if binds:  # volumes: their sources held before anything is covered, bound at their targets last
        lines += stash_lines(binds, mount, mkdir)
    done: list[Path] = []
    for i, root in enumerate(ordered):
        under = [e for e in exposures if _covers(root, e) and e != root]
        if root in exposures:
            continue  # exposed whole: nothing to cover
        if any(_covers(d, root) for d in done) and not any(_covers(e, root) for e in exposures):
            continue  # already out of sight under a covered directory
        done.append(root)
        stash = STASH / str(i)
        if under:
            lines += [f"{mkdir} {q(str(stash))}", f"{mount} --rbind {q(str(root))} {q(str(stash))}"]
        lines.append(f"{mount} -t tmpfs -o mode=0755,size=1m dstack-hidden {q(str(root))}")
        for e in under:
            src = stash / e.relative_to(root)
            lines += [f"{mkdir} -p {q(str(e))}", f"{mount} --rbind {q(str(src))} {q(str(e))}"]
    if binds:
        lines += target_lines(binds, mount, mkdir)
    setpriv = q(tools["setpriv"] or "setpriv")
    lines.append(
        f'exec {setpriv} --reuid={user.uid} --regid={user.gid} --clear-groups --inh-caps=-all --no-new-privs -- "$@"'
    )
    return "\n".join(lines)


# -- what jobs.py does for an isolated job -------------------------------------------------------
def prepare_job_dir(job_dir: Path, user: JobUser) -> None:
    """The job's agent-side directory: its user may enter it (its code, venv and script are
    there) but not list it (state and logs are the agent's); other users may not enter it."""
    os.chown(job_dir, 0, user.gid)
    os.chmod(job_dir, 0o710)
    repo = job_dir / "repo"
    repo.mkdir(exist_ok=True)
    os.chown(repo, user.uid, user.gid)
    os.chmod(repo, 0o700)


def shared_venv_key(version_root: Path, key: str, user: JobUser) -> str:
    """The key under which ``user`` keeps the shared venv ``key``: the same, unless another user
    already owns that venv (a key shared between projects), then one of its own."""
    try:
        owner = (version_root / key).lstat().st_uid
    except OSError:
        return key
    return key if owner in (0, user.uid) else f"{key}-u{user.uid}"


def adopt_venv(venv_dir: Path, user: JobUser) -> None:
    """A venv the agent built (as root) becomes the user's (its jobs ``pip install`` into it);
    the directories above it stay the agent's, enterable but not listable."""
    for d in (venv_dir.parent.parent, venv_dir.parent):
        os.chmod(d, 0o711)
    if venv_dir.lstat().st_uid != user.uid:
        give_tree(venv_dir, user)
    os.chmod(venv_dir, 0o700)  # what setup installed (and any config it wrote) stays the project's


def give_tree(path: Path, user: JobUser) -> None:
    """Hand a tree the agent wrote (code, a venv) to ``user``; symlinks are not followed."""
    if not path.exists() and not path.is_symlink():
        return
    os.chown(path, user.uid, user.gid, follow_symlinks=False)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), user.uid, user.gid, follow_symlinks=False)


def working_dir(repo: Path, wanted: str | None, user: JobUser) -> Path:
    """The job's working directory. Under its code or home it is made (as the user's); a path
    elsewhere must exist already: the agent does not make directories as root for a job."""
    if wanted and (wanted == "~" or wanted.startswith("~/")):
        wanted = str(user.home) + wanted[1:]
    path = repo / wanted if wanted and not os.path.isabs(wanted) else Path(wanted or repo)
    path = Path(os.path.normpath(path))
    real = Path(os.path.realpath(path))  # a symlink in the code must not lead root's mkdir elsewhere
    for base in (repo, user.home):
        if _covers(base, path) and _covers(Path(os.path.realpath(base)), real):
            missing = [p for p in [path, *path.parents] if _covers(base, p) and p != base and not p.exists()]
            for p in reversed(missing):
                p.mkdir()
                os.chown(p, user.uid, user.gid)
            return path
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} does not exist (jobs run as an unprivileged user: "
            f"a working_dir outside the code must exist on the host)"
        )
    return path


def user_env(env: dict[str, str], spec_env: dict[str, str], user: JobUser) -> dict[str, str]:
    """HOME, USER and LOGNAME of the job's user, unless the job's own env sets them."""
    env = dict(env)
    for key, value in (("HOME", str(user.home)), ("USER", user.name), ("LOGNAME", user.name)):
        if key not in spec_env:
            env[key] = value
    return env
