"""One SSH host from `apply` to `idle`: the cold case (a new host: the agent bundle shipped over
SFTP and unpacked, the agent started) and the warm case (the server restarted: the host
re-attached to its running agent). Hosts are network namespaces with their own sshd
(tests/fleets/hosts.py); needs root.

Each run also applies one more new host to a server with the bundle cache off
(DSTACK_SERVER_AGENT_BUNDLE_CACHE=off: the bundle is built at the apply, as every server did
before the cache), the peer; the ratio is printed. The server logs one line per host with the
time of each step (`fleet host ... idle in`); the medians of those steps are printed too.

    python bench/fleets/bench_host_idle.py [--runs N] [--no-peer]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from dstack.core.models.fleets import FleetConfiguration  # noqa: E402
from dstack.server.backends.ssh import bundle  # noqa: E402
from tests.conftest import running_server  # noqa: E402
from tests.fleets.hosts import HostNetwork  # noqa: E402


def _until_idle(client, name: str, timeout: float = 300) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        inst = client.fleets.get(name).instances[0]
        if inst.status == "idle":
            return time.monotonic() - t0
        if inst.status == "unreachable":
            raise RuntimeError(inst.status_message)
        time.sleep(0.05)
    raise RuntimeError("not idle")


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"


def _cold(base: Path, restart: bool, **env: str) -> tuple[float, dict[str, float], float | None]:
    """A new host applied to a fresh server: seconds to idle, the server's steps, and (`restart`)
    seconds from a SIGKILLed server's restart to the host re-attached."""
    net = HostNetwork(base / "net")
    try:
        (host,) = net.add_hosts(1)
        conf = FleetConfiguration.model_validate(
            {"type": "fleet", "name": "b", "ssh_config": {"identity_file": str(net.key), "hosts": [host.address]}}
        )
        with running_server(base, **env) as srv:
            client = srv.client()
            t0 = time.monotonic()
            client.fleets.apply(conf)
            cold = time.monotonic() - t0 + _until_idle(client, "b")
            steps = _phases(srv.logs(tail=200000))
            if not restart:
                return cold, steps, None
            srv.kill()
            srv.start()
            client = srv.client()
            t0 = time.monotonic()
            # the supervisor's first check finds the stale tunnel and re-attaches over SSH
            while client.fleets.get("b").instances[0].status != "idle" or "re-attached" not in srv.logs(tail=200000):
                time.sleep(0.05)
            return cold, steps, time.monotonic() - t0
    finally:
        net.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true", help="skip the cache-off peer runs")
    args = parser.parse_args()
    print("machine:", _machine(), flush=True)
    print(f"bundle cache: {bundle.cache_dir()}", flush=True)
    cold, warm, peer = [], [], []
    phases: list[dict[str, float]] = []
    peer_phases: list[dict[str, float]] = []
    for n in range(args.runs):
        # what a server that deployed before finds in the cache; made current before each run, as
        # this checkout may be edited meanwhile (then a server would build it again at the apply)
        bundle._cached = None
        t0 = time.monotonic()
        bundle.agent_bundle()
        print(f"run {n + 1}: bundle cache current in {time.monotonic() - t0:.2f} s", flush=True)
        seconds, steps, again = _cold(Path(tempfile.mkdtemp(prefix="bench-fleet-")), restart=True)
        cold.append(seconds)
        phases.append(steps)
        assert again is not None
        warm.append(again)
        print(f"run {n + 1}: new host {seconds:.2f} s ({steps}); restart re-attach {again:.2f} s", flush=True)
        if not args.no_peer:
            seconds, steps, _ = _cold(
                Path(tempfile.mkdtemp(prefix="bench-fleet-")), restart=False, DSTACK_SERVER_AGENT_BUNDLE_CACHE="off"
            )
            peer.append(seconds)
            peer_phases.append(steps)
            print(f"run {n + 1}: peer, bundle built at apply {seconds:.2f} s ({steps})", flush=True)
    rows = [("new host, apply -> idle", cold), ("server restart -> re-attached", warm)]
    if peer:
        rows.append(("peer: new host, bundle cache off", peer))
    for label, xs in rows:
        print(f"{label}: median {statistics.median(xs):.2f} s, max {max(xs):.2f} s over {len(xs)} runs")
    for label, runs in (("new host", phases), ("peer", peer_phases)):
        names = list(dict.fromkeys(n for p in runs for n in p))
        if names:
            medians = ", ".join(f"{n} {statistics.median(p.get(n, 0.0) for p in runs):.2f}" for n in names)
            print(f"{label} steps, median s (server log): {medians}")
    if peer:
        print(f"ratio new host / peer (medians): {statistics.median(cold) / statistics.median(peer):.2f}")
    print("machine at the end:", _machine())


def _phases(log: str) -> dict[str, float]:
    """The server's `fleet host ... idle in T s: step S, ...` line, as {step: seconds}."""
    found = re.findall(r"fleet host \S+ idle in [0-9.]+ s: (.*)", log)
    if not found:
        return {}
    return {name: float(sec) for name, sec in re.findall(r"([a-z +]+?) ([0-9.]+)(?:, |$)", found[-1].strip())}


if __name__ == "__main__":
    main()
