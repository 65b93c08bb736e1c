"""One SSH host from `apply` to `idle`: the cold case (the agent bundle built, shipped over SFTP
and unpacked, the agent started) and the warm case (the server restarted: the host re-attached
to its running agent). Hosts are network namespaces with their own sshd (tests/fleets/hosts.py);
needs root.

    python bench/fleets/bench_host_idle.py [--runs N]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from dstack.core.models.fleets import FleetConfiguration  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cold, warm = [], []
    phases: list[dict[str, float]] = []
    for _ in range(args.runs):
        base = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
        net = HostNetwork(base / "net")
        try:
            (host,) = net.add_hosts(1)
            conf = FleetConfiguration.model_validate(
                {"type": "fleet", "name": "b", "ssh_config": {"identity_file": str(net.key), "hosts": [host.address]}}
            )
            with running_server(base) as srv:
                client = srv.client()
                t0 = time.monotonic()
                client.fleets.apply(conf)
                cold.append(time.monotonic() - t0 + _until_idle(client, "b"))
                phases.append(_phases(srv.logs(tail=200000)))
                print(f"cold run {len(cold)}: {cold[-1]:.2f} s; server: {phases[-1]}", flush=True)
                srv.kill()
                srv.start()
                client = srv.client()
                t0 = time.monotonic()
                # the supervisor's first check finds the stale tunnel and re-attaches over SSH
                while client.fleets.get("b").instances[0].status != "idle" or not _reattached(srv):
                    time.sleep(0.05)
                warm.append(time.monotonic() - t0)
        finally:
            net.close()
    for label, xs in (("cold (ship + start)", cold), ("server restart (re-attach)", warm)):
        print(f"{label}: median {statistics.median(xs):.2f} s, max {max(xs):.2f} s over {len(xs)} runs")
    names = list(dict.fromkeys(n for p in phases for n in p))
    print(
        "cold phases, median s (server log):",
        ", ".join(f"{n} {statistics.median(p.get(n, 0.0) for p in phases):.2f}" for n in names),
    )


def _phases(log: str) -> dict[str, float]:
    """The server's `fleet host ... idle in T s: step S, ...` line, as {step: seconds}."""
    found = re.findall(r"fleet host \S+ idle in [0-9.]+ s: (.*)", log)
    if not found:
        return {}
    return {name: float(sec) for name, sec in re.findall(r"([a-z ]+?) ([0-9.]+)(?:, |$)", found[-1].strip())}


def _reattached(srv) -> bool:
    return "re-attached to the agent on b-0" in srv.logs(tail=200000) or "re-attached" in srv.logs(tail=200000)


if __name__ == "__main__":
    main()
