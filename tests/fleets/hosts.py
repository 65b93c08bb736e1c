"""Test hosts for SSH fleets: network namespaces on a private bridge, each with its own sshd.

Each host is a network namespace with one veth link onto a bridge in the root namespace (where
the server runs), its own address, its own hostname (a UTS namespace) and its own `/root` (a
tmpfs in a private mount namespace), so what the server ships over SFTP into the host's home is
really that host's copy. `sshd` is Debian's openssh-server with its own config and host key;
the test user is root, logging in with a key generated for the session.

Everything is torn down by `HostNetwork.close()`: processes in the namespaces (the sshd and
whatever was started through it) are killed by pid, then the namespaces and the bridge go.
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dstack.core.models.fleets import FleetConfiguration
from tests.util import wait_for

SSHD = "/usr/sbin/sshd"
MAX_HOSTS = 60  # bounded: one /24, addresses .2 .. .61


class HostsUnavailable(Exception):
    """This machine cannot make namespaced hosts (not root, no `ip netns`, no sshd): a skip reason."""


@dataclass
class Host:
    name: str  # also its hostname and its namespace's suffix
    netns: str
    address: str
    veth: str  # the root-namespace end of its link
    dir: Path
    port: int = 22
    sshd: subprocess.Popen | None = field(default=None, repr=False)

    def exec(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a command inside the host (its network namespace only)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *cmd], capture_output=True, text=True, timeout=timeout
        )

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split() if p.isdigit()]


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def check_available() -> None:
    """Raise `HostsUnavailable` with the reason this machine cannot make hosts."""
    if os.geteuid() != 0:
        raise HostsUnavailable("namespaced SSH hosts need root (ip netns, bridges, sshd)")
    for tool in ("ip", "unshare", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise HostsUnavailable(f"namespaced SSH hosts need {tool!r} (iproute2, util-linux, openssh-client)")
    if not os.path.exists(SSHD):
        raise HostsUnavailable(f"namespaced SSH hosts need {SSHD} (Debian's openssh-server)")
    probe = f"dsprobe{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        raise HostsUnavailable(f"'ip netns add' does not work here: {r.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.77.X.0/24 no route here uses (parallel sessions each get their own)."""
    routes = _run("ip", "-4", "route", "show").stdout
    used = set()
    for line in routes.splitlines():
        with contextlib.suppress(ValueError):
            used.add(ipaddress.ip_network(line.split()[0], strict=False))
    for _ in range(200):
        net = ipaddress.ip_network(f"10.77.{secrets.randbelow(254) + 1}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise HostsUnavailable("no free 10.77.X.0/24 subnet for test hosts")


class HostNetwork:
    """A bridge and up to `MAX_HOSTS` hosts; use as a context manager or call `close()`."""

    def __init__(self, base: Path) -> None:
        check_available()
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.tag = secrets.token_hex(2)
        self.bridge = f"dsbr{self.tag}"
        self.subnet = _free_subnet()
        self.gateway = str(self.subnet.network_address + 1)
        self.hosts: list[Host] = []
        #: the second network (`add_private_host`): its bridge, subnet and the jump host's address there
        self.private: tuple[str, ipaddress.IPv4Network, str] | None = None
        self.private_links: list[str] = []
        self.key = self.base / "id_ed25519"
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dstack-test", "-f", str(self.key))
        self.authorized_keys = self.base / "authorized_keys"
        self.authorized_keys.write_text(self.key.with_suffix(".pub").read_text())
        self.authorized_keys.chmod(0o600)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_hosts(self, n: int) -> list[Host]:
        if len(self.hosts) + n > MAX_HOSTS:
            raise ValueError(f"at most {MAX_HOSTS} hosts")
        new = [self._add_host() for _ in range(n)]
        for h in new:
            self.wait_sshd(h)
        return new

    def add_private_host(self, jump: Host) -> Host:
        """A host on a second bridge that this machine has no address on (so no route to), reached
        only through `jump`: the jump host gets a second link there (`eth1`, the private
        network's .1) and the new host's sshd listens on the private network only."""
        if self.private is None:
            subnet = _free_subnet()
            if subnet.overlaps(self.subnet):
                raise HostsUnavailable("no second free subnet for a private network")
            bridge = f"dsbq{self.tag}"
            _run("ip", "link", "add", bridge, "type", "bridge")
            _run("ip", "link", "set", bridge, "up")
            self.private = (bridge, subnet, str(subnet.network_address + 1))
            link = f"dsj{self.tag}"
            _run("ip", "link", "add", link, "type", "veth", "peer", "name", f"{link}p")
            self.private_links.append(link)
            _run("ip", "link", "set", f"{link}p", "netns", jump.netns)
            _run("ip", "link", "set", link, "master", bridge)
            _run("ip", "link", "set", link, "up")
            ns = ("ip", "netns", "exec", jump.netns)
            _run(*ns, "ip", "link", "set", f"{link}p", "name", "eth1")
            _run(*ns, "ip", "addr", "add", f"{self.private[2]}/{subnet.prefixlen}", "dev", "eth1")
            _run(*ns, "ip", "link", "set", "eth1", "up")
        bridge, subnet, gateway = self.private
        count = sum(1 for h in self.hosts if ipaddress.ip_address(h.address) in subnet)
        host = self._add_host(net=(bridge, subnet, gateway), address=str(subnet.network_address + 2 + count))
        deadline = time.monotonic() + 20
        while True:  # this machine cannot connect to it: look for the listener from inside
            assert host.sshd is not None
            if host.sshd.poll() is not None:
                raise RuntimeError(f"sshd of {host.name} exited: {(host.dir / 'sshd.log').read_text()[-2000:]}")
            if f"{host.address}:22 " in host.exec("ss", "-ltnH").stdout:
                return host
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd of {host.name} did not listen on {host.address}:22 within 20 s")
            time.sleep(0.1)

    def _add_host(self, net: tuple[str, ipaddress.IPv4Network, str] | None = None, address: str | None = None) -> Host:
        i = len(self.hosts)
        name = f"h{i}"
        netns = f"ds{self.tag}{name}"
        bridge, subnet, gateway = net or (self.bridge, self.subnet, self.gateway)
        address = address or str(self.subnet.network_address + 2 + i)
        veth = f"dsv{self.tag}{i}"
        d = self.base / name
        d.mkdir()
        host = Host(name=name, netns=netns, address=address, veth=veth, dir=d)
        self.hosts.append(host)  # from here on close() removes it, whatever fails next
        _run("ip", "netns", "add", netns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        _run("ip", "link", "set", f"{veth}p", "netns", netns)
        _run("ip", "link", "set", veth, "master", bridge)
        _run("ip", "link", "set", veth, "up")
        ns = ("ip", "netns", "exec", netns)
        _run(*ns, "ip", "link", "set", "lo", "up")
        _run(*ns, "ip", "link", "set", f"{veth}p", "name", "eth0")
        _run(*ns, "ip", "addr", "add", f"{address}/{subnet.prefixlen}", "dev", "eth0")
        _run(*ns, "ip", "link", "set", "eth0", "up")
        _run(*ns, "ip", "route", "add", "default", "via", gateway)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "ssh_host_ed25519_key"))
        (d / "sshd_config").write_text(
            "\n".join(
                [
                    "Port 22",
                    f"ListenAddress {address}",
                    f"HostKey {d / 'ssh_host_ed25519_key'}",
                    f"PidFile {d / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "StrictModes no",
                    "UsePAM no",
                    "AllowTcpForwarding yes",
                    "PrintMotd no",
                    "Subsystem sftp internal-sftp",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        self.start_sshd(host)
        return host

    def start_sshd(self, host: Host) -> None:
        """(Re)start the host's sshd: its own hostname and a private, empty /root."""
        script = f"hostname {host.name} && mount -t tmpfs -o mode=0700 tmpfs /root && exec {SSHD} -D -e -f {host.dir}/sshd_config"
        log = open(host.dir / "sshd.log", "ab")
        host.sshd = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                host.netns,
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
        )
        log.close()

    def wait_sshd(self, host: Host, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert host.sshd is not None
            if host.sshd.poll() is not None:
                raise RuntimeError(f"sshd of {host.name} exited: {(host.dir / 'sshd.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((host.address, host.port), timeout=1) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"sshd of {host.name} did not answer on {host.address}:22 within {timeout:g} s")

    def kill_host(self, host: Host) -> None:
        """Kill every process in the host (sshd, agent, jobs) and take its link down."""
        self.link_down(host)
        self._kill_pids(host)

    def link_down(self, host: Host) -> None:
        _run("ip", "link", "set", host.veth, "down", check=False)

    def link_up(self, host: Host) -> None:
        _run("ip", "link", "set", host.veth, "up", check=False)

    def _kill_pids(self, host: Host) -> None:
        for pid in host.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if host.sshd is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                host.sshd.wait(5)

    def close(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                self._kill_pids(host)
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
        self.hosts = []
        for link in self.private_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        if self.private is not None:
            subprocess.run(["ip", "link", "del", self.private[0]], capture_output=True)
            self.private = None
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@contextlib.contextmanager
def host_network(base: Path, n: int) -> Iterator[HostNetwork]:
    """`n` namespaced hosts, removed on exit; `HostsUnavailable` when this machine cannot make them."""
    check_available()
    net = HostNetwork(base)
    try:
        net.add_hosts(n)
        yield net
    finally:
        net.close()


@contextlib.contextmanager
def hosts_or_skip(base: Path, n: int) -> Iterator[HostNetwork]:
    """`host_network` for fixtures: a test skip that says why when hosts cannot be made here."""
    try:
        cm = host_network(base, n)
        net = cm.__enter__()
    except HostsUnavailable as e:
        pytest.skip(str(e))
    try:
        yield net
    finally:
        cm.__exit__(None, None, None)


def apply_fleet(
    client: Any,
    net: HostNetwork,
    name: str,
    hosts: Sequence[Host],
    *,
    timeout: float = 180,
    ssh_config: dict[str, Any] | None = None,
    **fields: Any,
) -> Any:
    """Apply fleet `name` of `hosts` (logged into with the network's key) through `client`
    (`dstack.api.Client`) and return it once every host is idle. A host whose attach ran out of
    time under load is retried by the server every 10 s, so `unreachable` on the way is waited out."""
    conf = FleetConfiguration.model_validate(
        {
            "type": "fleet",
            "name": name,
            **fields,
            "ssh_config": {"identity_file": str(net.key), "hosts": [h.address for h in hosts], **(ssh_config or {})},
        }
    )
    client.fleets.apply(conf)
    return wait_for(lambda: client.fleets.get(name), lambda f: all(i.status == "idle" for i in f.instances), timeout)


def wait_fleet_free(client: Any, name: str, timeout: float = 60) -> Any:
    """Return fleet `name` once no instance of it holds a job (a stopped run's jobs are gone)."""
    return wait_for(lambda: client.fleets.get(name), lambda f: not any(i.jobs for i in f.instances), timeout)
