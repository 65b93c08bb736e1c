"""Per-job network namespaces, so jobs on one host can each listen on the same port.

An isolated job gets a namespace ``dstack-<first 8 of its id>`` with loopback up and one veth
pair: the host side ``dsh<slot>`` stays in the root namespace, the peer ``dsn<slot>`` moves into
the job's namespace. Slot ``n`` is the /30 ``10.213.0.0/16 + 4n``: ``.1`` on the host side,
``.2`` (the job's ``address``) inside, default route via the host side. Outbound traffic is
forwarded and masqueraded (iptables, else nft) when the host has either tool.

Slots are unique host-wide: they are picked under an exclusive lock on a file in ``RUN_DIR``
(shared by every agent on the host), skipping slots this agent holds and slots whose host-side
address is already configured on some interface. Each namespace gets a marker file
``RUN_DIR/<ns>.json`` naming the agent home and job that own it, so an agent that starts can
tell its own leftovers and abandoned namespaces from those of another live agent.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dstack.agent.capability import HostCapability, find_tool

logger = logging.getLogger(__name__)

POOL = ipaddress.IPv4Network("10.213.0.0/16")
SLOT_SIZE = 4  # a /30: network, host side, job side, broadcast
SLOTS = POOL.num_addresses // SLOT_SIZE
NS_PREFIX = "dstack-"
NETNS_DIR = Path("/run/netns")  # where iproute2 keeps named namespaces
RUN_DIR = Path("/run/dstack-agent/netns")
ETC_NETNS = Path("/etc/netns")  # `ip netns exec` bind-mounts /etc/netns/<ns>/* over /etc/*
IP_TIMEOUT = 10.0
SLOW_LOCK_SECONDS = 1.0  # a longer wait for the host-wide lock is logged


class NetnsError(Exception):
    pass


@dataclass
class NetnsAllocation:
    """One job's namespace; persisted in the job's state.json under ``"netns"``."""

    netns: str
    slot: int
    host_if: str
    peer_if: str
    host_ip: str
    address: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> NetnsAllocation | None:
        try:
            return cls(
                str(data["netns"]),
                int(data["slot"]),
                str(data["host_if"]),
                str(data["peer_if"]),
                str(data["host_ip"]),
                str(data["address"]),
            )
        except (TypeError, KeyError, ValueError):
            return None


def slot_addresses(slot: int) -> tuple[str, str]:
    """(host side IP, job side IP) of a slot."""
    base = int(POOL.network_address) + slot * SLOT_SIZE
    return str(ipaddress.IPv4Address(base + 1)), str(ipaddress.IPv4Address(base + 2))


def slot_of(address: str) -> int | None:
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return None
    if ip not in POOL:
        return None
    return (int(ip) - int(POOL.network_address)) // SLOT_SIZE


class NetworkIsolation(HostCapability):
    """Creates and removes job namespaces for one agent (identified by its home directory)."""

    disable_env = "DSTACK_AGENT_NO_NETNS"
    what = "network isolation"

    def __init__(self, home: Path) -> None:
        super().__init__()
        self.home = str(Path(home).resolve())
        self.ip = find_tool("ip")
        self._lock = threading.Lock()
        self._active: dict[str, NetnsAllocation] = {}  # by namespace name
        self._nat: str | None = None  # "iptables" | "nft" | "none" once set up

    # -- capability ------------------------------------------------------------------------
    def _try(self) -> str:
        """A working ``ip``: create (and delete) a throwaway namespace with a veth."""
        if self.ip is None:
            return "`ip` (iproute2) not found"
        name = f"{NS_PREFIX}probe-{os.getpid()}"
        try:
            with self._host_lock():  # so no other agent's cleanup takes it for stale
                self._run_ip("netns", "add", name)
                try:
                    self._run_ip("-n", name, "link", "add", "dsprobe0", "type", "veth", "peer", "name", "dsprobe1")
                finally:
                    self._run_ip("netns", "del", name, check=False)
        except (NetnsError, OSError) as e:
            return str(e) or type(e).__name__
        return ""

    # -- helpers ---------------------------------------------------------------------------
    def _run_ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        assert self.ip is not None
        return _run([self.ip, *args], check=check)

    @contextmanager
    def _host_lock(self) -> Iterator[None]:
        """Serialise allocation with this agent's threads and every other agent on the host."""
        with self._lock:
            RUN_DIR.mkdir(parents=True, exist_ok=True)
            fd = os.open(RUN_DIR.parent / "netns.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                asked = time.monotonic()
                fcntl.flock(fd, fcntl.LOCK_EX)
                waited = time.monotonic() - asked
                if waited > SLOW_LOCK_SECONDS:
                    logger.warning("waited %.1f s for the host's network lock (another agent held it)", waited)
                yield
            finally:
                os.close(fd)  # releases the flock

    def _host_pool_slots(self) -> set[int]:
        """Slots whose addresses are configured on any interface of the root namespace."""
        out = self._run_ip("-4", "-o", "addr", "show", check=False).stdout
        slots: set[int] = set()
        for match in re.finditer(r"\sinet\s+([0-9.]+)/", out):
            slot = slot_of(match.group(1))
            if slot is not None:
                slots.add(slot)
        return slots

    def exec_prefix(self, alloc: NetnsAllocation) -> list[str]:
        """Prefix of the job's command line: ``ip netns exec`` execs the command, keeping its pid."""
        assert self.ip is not None
        return [self.ip, "netns", "exec", alloc.netns]

    # -- lifecycle -------------------------------------------------------------------------
    def setup(self, job_id: str) -> NetnsAllocation:
        """Create the namespace, veth pair, addresses and routes of one job."""
        if not self.available:
            raise NetnsError(f"network isolation unavailable: {self.reason}")
        with self._host_lock():
            used = {a.slot for a in self._active.values()} | self._host_pool_slots()
            slot = next((s for s in range(SLOTS) if s not in used), None)
            if slot is None:
                raise NetnsError(f"no free /30 left in {POOL}")
            short = re.sub(r"[^A-Za-z0-9_.-]", "_", job_id[:8])
            name = f"{NS_PREFIX}{short}"
            if (NETNS_DIR / name).exists() or name in self._active:
                name = f"{NS_PREFIX}{short}-{slot}"
            host_ip, address = slot_addresses(slot)
            alloc = NetnsAllocation(name, slot, f"dsh{slot}", f"dsn{slot}", host_ip, address)
            _write_marker(name, {"home": self.home, "job_id": job_id, "slot": slot, "pid": os.getpid()})
            self._active[name] = alloc
            try:
                self._create(alloc)
            except Exception:
                self._remove(alloc)
                raise
        self._ensure_nat()
        self._resolv_conf(alloc)
        return alloc

    def _create(self, a: NetnsAllocation) -> None:
        # A leftover host-side veth with this name carries no pool address (else the slot would
        # be taken), so it is garbage from an agent that died mid-setup.
        self._run_ip("link", "del", a.host_if, check=False)
        self._run_ip("netns", "add", a.netns)
        self._run_ip("link", "add", a.host_if, "type", "veth", "peer", "name", a.peer_if)
        self._run_ip("link", "set", a.peer_if, "netns", a.netns)
        self._run_ip("addr", "add", f"{a.host_ip}/30", "dev", a.host_if)
        self._run_ip("link", "set", a.host_if, "up")
        self._run_ip("-n", a.netns, "link", "set", "lo", "up")
        self._run_ip("-n", a.netns, "addr", "add", f"{a.address}/30", "dev", a.peer_if)
        self._run_ip("-n", a.netns, "link", "set", a.peer_if, "up")
        self._run_ip("-n", a.netns, "route", "add", "default", "via", a.host_ip)

    def teardown(self, alloc: NetnsAllocation) -> None:
        """Kill what still runs in the namespace, then remove it, its veth pair and marker. Idempotent.

        Without the host-wide lock: the lock makes slot *choice* unique, and nobody chooses this
        slot until its host-side address is gone, which is this teardown's doing. Taking the lock
        here made a job's end wait on every other agent's namespace work.
        """
        if self.ip is None:
            return
        self._remove(alloc)

    def _remove(self, a: NetnsAllocation) -> None:
        if (NETNS_DIR / a.netns).exists():
            out = self._run_ip("netns", "pids", a.netns, check=False).stdout
            for pid in out.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ValueError, ProcessLookupError, PermissionError):
                    pass
        if a.host_if:
            self._run_ip("link", "del", a.host_if, check=False)
        self._run_ip("netns", "del", a.netns, check=False)
        _marker(a.netns).unlink(missing_ok=True)
        shutil.rmtree(ETC_NETNS / a.netns, ignore_errors=True)
        self._active.pop(a.netns, None)

    def cleanup_stale(self) -> None:
        """At agent start: remove ``dstack-*`` namespaces no live job owns.

        Stale: this agent's own (its jobs are all dead after a restart), those whose owner's job
        directory is gone, those with no process left whose owning agent is gone, and unmarked
        ones with no process left. Another live agent's namespaces stay.
        """
        if not self.available:
            return
        names = sorted(p.name for p in NETNS_DIR.glob(f"{NS_PREFIX}*")) if NETNS_DIR.is_dir() else []
        for name in names:
            # The lock is taken per namespace, not for the whole scan: a host with hundreds of
            # them would otherwise hold up every other agent's jobs while this one starts.
            with self._host_lock():
                if name not in self._active and (NETNS_DIR / name).exists():
                    self._remove_if_stale(name)
        with self._host_lock():
            if RUN_DIR.is_dir():  # markers whose namespace is gone
                for path in RUN_DIR.glob(f"{NS_PREFIX}*.json"):
                    if not (NETNS_DIR / path.name[: -len(".json")]).exists():
                        path.unlink(missing_ok=True)

    def _remove_if_stale(self, name: str) -> None:
        marker = _read_marker(name)
        empty = not self._run_ip("netns", "pids", name, check=False).stdout.strip()
        if marker is not None:
            owner = str(marker.get("home", ""))
            job_dir = Path(owner) / "jobs" / str(marker.get("job_id", ""))
            owner_pid = marker.get("pid")
            owner_dead = not (isinstance(owner_pid, int) and _pid_alive(owner_pid))
            stale = owner == self.home or not job_dir.is_dir() or (owner_dead and empty)
        else:
            stale = empty
        if not stale:
            return
        logger.info("removing stale network namespace %s", name)
        slot = marker.get("slot") if marker else None
        if isinstance(slot, int):
            host_ip, address = slot_addresses(slot)
            self._remove(NetnsAllocation(name, slot, f"dsh{slot}", f"dsn{slot}", host_ip, address))
        else:
            self._remove(NetnsAllocation(name, -1, "", "", "", ""))

    def adopt(self, alloc: NetnsAllocation) -> None:
        """Remember an allocation read from a job's state.json (until it is torn down)."""
        self._active[alloc.netns] = alloc

    # -- outbound access -------------------------------------------------------------------
    def _ensure_nat(self) -> None:
        """ip_forward + MASQUERADE for the pool, once per agent; warns once if impossible."""
        if self._nat is not None:
            return
        with self._lock:
            if self._nat is not None:
                return
            try:
                Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
            except OSError as e:
                logger.warning("cannot enable net.ipv4.ip_forward (%s): isolated jobs get no outbound access", e)
            iptables, nft = find_tool("iptables"), find_tool("nft")
            try:
                if iptables:
                    _iptables_nat(iptables)
                    self._nat = "iptables"
                elif nft:
                    _nft_nat(nft)
                    self._nat = "nft"
                else:
                    self._nat = "none"
                    logger.warning(
                        "neither iptables nor nft found: isolated jobs reach only the host "
                        "(via their veth), not the outside"
                    )
            except NetnsError as e:
                self._nat = "none"
                logger.warning("could not set up NAT for %s (%s): isolated jobs get no outbound access", POOL, e)

    def _resolv_conf(self, a: NetnsAllocation) -> None:
        """If /etc/resolv.conf points at a loopback resolver (unreachable from the namespace),
        give the namespace the upstream servers systemd-resolved uses, when known."""
        servers = _nameservers(Path("/etc/resolv.conf"))
        if not servers or not all(_is_loopback(s) for s in servers):
            return
        upstream = Path("/run/systemd/resolve/resolv.conf")
        up_servers = _nameservers(upstream)
        if up_servers and not all(_is_loopback(s) for s in up_servers):
            try:
                (ETC_NETNS / a.netns).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(upstream, ETC_NETNS / a.netns / "resolv.conf")
                return
            except OSError:
                pass
        logger.warning("DNS resolver of this host is on loopback; isolated job %s may not resolve names", a.netns)


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        if check:
            raise NetnsError(f"{' '.join(cmd)}: {e}") from e
        return subprocess.CompletedProcess(cmd, 1, "", str(e))
    if check and out.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)}: {out.stderr.strip() or f'exit status {out.returncode}'}")
    return out


def _iptables_nat(exe: str) -> None:
    pool = str(POOL)
    rules = [
        ("nat", "POSTROUTING", ["-s", pool, "!", "-d", pool, "-j", "MASQUERADE"], "-A"),
        # Insert at the top so a FORWARD policy of DROP (e.g. Docker's) does not block the jobs.
        ("filter", "FORWARD", ["-s", pool, "-j", "ACCEPT"], "-I"),
        (
            "filter",
            "FORWARD",
            ["-d", pool, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"],
            "-I",
        ),
    ]
    for table, chain, rule, how in rules:
        if _run([exe, "-w", "-t", table, "-C", chain, *rule], check=False).returncode != 0:
            _run([exe, "-w", "-t", table, how, chain, *rule])


def _nft_nat(exe: str) -> None:
    pool = str(POOL)
    listed = _run([exe, "list", "table", "ip", "dstack_agent"], check=False)
    if listed.returncode == 0 and "masquerade" in listed.stdout:
        return
    script = (
        "table ip dstack_agent {\n"
        "  chain postrouting { type nat hook postrouting priority 100; policy accept;\n"
        f"    ip saddr {pool} ip daddr != {pool} masquerade\n  }}\n"
        "  chain forward { type filter hook forward priority 0; policy accept;\n"
        f"    ip saddr {pool} accept\n    ip daddr {pool} ct state related,established accept\n  }}\n"
        "}\n"
    )
    try:
        out = subprocess.run([exe, "-f", "-"], input=script, capture_output=True, text=True, timeout=IP_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as e:
        raise NetnsError(f"nft: {e}") from e
    if out.returncode != 0:
        raise NetnsError(f"nft: {out.stderr.strip()}")


def _nameservers(path: Path) -> list[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    return [parts[1] for parts in (line.split() for line in lines) if len(parts) >= 2 and parts[0] == "nameserver"]


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _marker(name: str) -> Path:
    return RUN_DIR / f"{name}.json"


def _write_marker(name: str, data: dict[str, Any]) -> None:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    tmp = RUN_DIR / f".{name}.json.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, _marker(name))


def _read_marker(name: str) -> dict[str, Any] | None:
    try:
        data = json.loads(_marker(name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
