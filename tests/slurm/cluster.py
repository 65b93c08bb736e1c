"""A throwaway Slurm cluster from Debian's packages, for the Slurm backend's tests.

The controller (`slurmctld`) runs in the root network namespace, bound to a private bridge; each
compute node is a `slurmd` with its own node name in its own network namespace on that bridge,
entered with `nsenter --net` plus `unshare --uts --mount` (Debian's `slurmd` cannot run twice in
one namespace, and `ip netns exec` remounts `/sys`, which this `slurmd` then fails on). A private
munge key and socket (`AuthInfo=socket=...`) keep `/etc` untouched. Node `sn1` has a fake GPU
(a GRES whose `File=` is `/dev/null`: a count-only GRES makes `slurmd` report none and drain).

Everything lives under one directory; `SlurmCluster.close()` kills what it started by pid and
removes the namespaces and the bridge.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRAMS = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "nsenter", "ip")
PARTITION = "debug"


class ClusterUnavailable(Exception):
    """This machine cannot run a test cluster (not root, packages missing): a skip reason."""


@dataclass
class Node:
    name: str
    netns: str
    address: str
    veth: str
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)


def check_available() -> None:
    """Raise `ClusterUnavailable` with the reason this machine cannot run a test cluster."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("a test Slurm cluster needs root (network namespaces, SlurmUser=root)")
    for prog in PROGRAMS:
        if shutil.which(prog) is None and not os.path.exists(f"/usr/sbin/{prog}"):
            raise ClusterUnavailable(
                f"a test Slurm cluster needs {prog!r} (Debian: slurmctld slurmd munge slurm-client util-linux iproute2)"
            )


def _run(
    *cmd: str, check: bool = True, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, env=env, cwd=cwd)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.78.X.0/24 no route here uses (the fleet tests take 10.77.X; sessions run in parallel)."""
    used = []
    for line in _run("ip", "-4", "route", "show").stdout.splitlines():
        with contextlib.suppress(ValueError):
            used.append(ipaddress.ip_network(line.split()[0], strict=False))
    for _ in range(200):
        net = ipaddress.ip_network(f"10.78.{secrets.randbelow(254) + 1}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise ClusterUnavailable("no free 10.78.X.0/24 subnet for a test cluster")


class SlurmCluster:
    """Two compute nodes (`sn1` with one fake GPU, `sn2` without), partition `debug`."""

    def __init__(self, base: Path, cpus: int = 4, memory_mib: int = 16384, min_job_age: int = 300) -> None:
        check_available()
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)  # munge wants its socket's directory searchable by all
        self.tag = secrets.token_hex(2)
        self.bridge = f"dssb{self.tag}"
        self.subnet = _free_subnet()
        self.gateway = str(self.subnet.network_address + 1)
        self.cpus, self.memory_mib = cpus, memory_mib
        self.conf = base / "slurm.conf"
        self.munge_socket = base / "munge.sock"
        self.nodes: list[Node] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self.ctld: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        try:
            self._network()
            self._write_config(min_job_age)
            self._start_munge()
            self._start_ctld()
            for node in self.nodes:
                self.start_node(node)
            self.wait_nodes_idle()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup ---------------------------------------------------------------------------------

    def _network(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for i in range(2):
            name = f"sn{i + 1}"
            node = Node(
                name=name,
                netns=f"dss{self.tag}{name}",
                address=str(self.subnet.network_address + 2 + i),
                veth=f"dssv{self.tag}{i}",
            )
            self.nodes.append(node)  # close() removes it from here on
            _run("ip", "netns", "add", node.netns)
            _run("ip", "link", "add", node.veth, "type", "veth", "peer", "name", f"{node.veth}p")
            _run("ip", "link", "set", f"{node.veth}p", "netns", node.netns)
            _run("ip", "link", "set", node.veth, "master", self.bridge)
            _run("ip", "link", "set", node.veth, "up")
            ns = ("ip", "netns", "exec", node.netns)
            _run(*ns, "ip", "link", "set", "lo", "up")
            _run(*ns, "ip", "addr", "add", f"{node.address}/{self.subnet.prefixlen}", "dev", f"{node.veth}p")
            _run(*ns, "ip", "link", "set", f"{node.veth}p", "up")
            _run(*ns, "ip", "route", "add", "default", "via", self.gateway)

    def _write_config(self, min_job_age: int) -> None:
        b = self.base
        (b / "state").mkdir(exist_ok=True)
        (b / "spool").mkdir(exist_ok=True)
        for node in self.nodes:
            (b / "spool" / node.name).mkdir(exist_ok=True)
        self.ctld_port, self.slurmd_port = _free_port(), _free_port()
        lines = [
            f"ClusterName=ds{self.tag}",
            f"SlurmctldHost={socket.gethostname().split('.')[0]}({self.gateway})",  # must be this host's name
            "MailProg=/bin/true",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={b / 'state'}",
            f"SlurmdSpoolDir={b / 'spool'}/%n",
            f"SlurmctldPidFile={b / 'slurmctld.pid'}",
            f"SlurmdPidFile={b / 'spool'}/%n/slurmd.pid",
            f"SlurmctldLogFile={b / 'slurmctld.log'}",
            f"SlurmdLogFile={b / 'spool'}/%n/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "SchedulerParameters=batch_sched_delay=0",
            "SlurmdParameters=config_overrides",
            f"MinJobAge={min_job_age}",
            "ReturnToService=2",
            "SlurmdTimeout=10",
            "MpiDefault=none",
            "GresTypes=gpu",
        ]
        for node in self.nodes:
            gres = " Gres=gpu:fake:1" if node.name == "sn1" else ""
            lines.append(
                f"NodeName={node.name} NodeAddr={node.address} NodeHostname={node.name} CPUs={self.cpus} "
                f"RealMemory={self.memory_mib}{gres} State=UNKNOWN"
            )
        names = ",".join(n.name for n in self.nodes)
        lines.append(f"PartitionName={PARTITION} Nodes={names} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (b / "gres.conf").write_text("NodeName=sn1 Name=gpu Type=fake File=/dev/null\n")
        (b / "cgroup.conf").write_text("CgroupPlugin=autodetect\n")

    def _start_munge(self) -> None:
        key = self.base / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        log = open(self.base / "munged.log", "ab")
        proc = subprocess.Popen(
            [
                "munged",
                "--foreground",
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={self.base / 'munged.pid'}",
                f"--log-file={self.base / 'munged.log'}",
                f"--seed-file={self.base / 'munged.seed'}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self._procs.append(proc)
        _wait(lambda: self.munge_socket.exists(), 10, "munged did not create its socket")

    def _start_ctld(self) -> None:
        log = open(self.base / "slurmctld.out", "ab")
        self.ctld = subprocess.Popen(
            ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        log.close()
        self._procs.append(self.ctld)
        _wait(
            lambda: _run("scontrol", "ping", check=False, env=self.env).stdout.count("UP") > 0,
            20,
            f"slurmctld did not answer: {self._tail(self.base / 'slurmctld.log')}",
        )

    def start_node(self, node: Node) -> None:
        """(Re)start the node's `slurmd` in its namespace, with its own hostname."""
        script = f"hostname {node.name} && exec slurmd -D -N {node.name} -f {self.conf}"
        log = open(self.base / "spool" / node.name / "slurmd.out", "ab")
        node.proc = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{node.netns}",
                "unshare",
                "--uts",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        log.close()
        self._procs.append(node.proc)

    def kill_node(self, node: Node) -> None:
        """SIGKILL the node's `slurmd` and everything in its namespace (a node failure)."""
        for pid in self._netns_pids(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if node.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=5)

    def wait_nodes_idle(self, timeout: float = 40) -> None:
        def idle() -> bool:
            out = self.cli("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            return len(states) == len(self.nodes) and all(s.rstrip("*") in ("idle", "mix") for s in states.values())

        _wait(idle, timeout, lambda: f"nodes did not come up: {self.cli('sinfo', '-N', check=False).stdout}")

    # -- use -----------------------------------------------------------------------------------

    def cli(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm command against this cluster (from its directory: `sbatch --wrap` output lands there)."""
        return _run(*cmd, check=check, env=self.env, cwd=self.base)

    def job_field(self, job_id: str, name: str) -> str:
        """One `Key=Value` field of `scontrol show job` (e.g. `JobState`, `Reason`, `TRES`)."""
        out = self.cli("scontrol", "show", "job", "-o", job_id).stdout
        for token in out.split():
            key, _, value = token.partition("=")
            if key == name:
                return value
        raise KeyError(f"{name} not in scontrol show job {job_id}: {out}")

    def cancel_all(self) -> None:
        """Cancel every job Slurm still holds (a test's server may leave allocations behind)."""
        for job_id in self.cli("squeue", "-h", "-o", "%i", check=False).stdout.split():
            self.cli("scancel", job_id, check=False)

    def write_server_config(self, server_home: Path, shared_dir: Path, **settings: str) -> None:
        """A test server's `~/.dstack/server/config.yml`: project `main` with this cluster's partition as
        its Slurm backend, plus `settings` (e.g. `login`, `server_url`) as given, in YAML."""
        lines = ["projects:", "  - name: main", "    backends:", "      - type: slurm"]
        lines += [f"        partitions: [{PARTITION}]", f"        shared_dir: {shared_dir}"]
        lines += [f"        {key}: {value}" for key, value in settings.items()]
        (server_home / "server").mkdir(parents=True, exist_ok=True)
        (server_home / "server" / "config.yml").write_text("\n".join(lines) + "\n")

    # -- teardown ------------------------------------------------------------------------------

    def _netns_pids(self, node: Node) -> list[int]:
        out = _run("ip", "netns", "pids", node.netns, check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def close(self) -> None:
        for node in self.nodes:
            self.kill_node(node)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        for node in self.nodes:
            _run("ip", "netns", "del", node.netns, check=False)
            _run("ip", "link", "del", node.veth, check=False)
        _run("ip", "link", "del", self.bridge, check=False)

    @staticmethod
    def _tail(path: Path, n: int = 2000) -> str:
        try:
            return path.read_text(errors="replace")[-n:]
        except OSError:
            return f"(no {path.name})"


def _wait(cond, timeout: float, message) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise RuntimeError(message() if callable(message) else message)
