"""A 3-host SSH fleet through a real server: planned (hosts probed), applied (agents shipped over
SFTP and started on each host, reached only through SSH), listed, updated in place, re-applied
idempotently, instances deleted, the fleet deleted. Hosts are namespaces with their own sshd."""

import json
import subprocess
import time

import pytest

from dstack.core.models.fleets import FleetConfiguration
from tests.conftest import running_server

pytestmark = pytest.mark.slow


def _conf(net, hosts, name="lab") -> FleetConfiguration:
    return FleetConfiguration.model_validate(
        {
            "type": "fleet",
            "name": name,
            "ssh_config": {"user": "root", "identity_file": str(net.key), "hosts": [h.address for h in hosts]},
        }
    )


def _ssh(net, host, command: str) -> str:
    r = subprocess.run(
        ["ssh", "-i", str(net.key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"root@{host.address}", command],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return r.stdout


def _wait_status(client, name, want: dict[str, str], timeout: float = 180):
    deadline = time.time() + timeout
    fleet = None
    while time.time() < deadline:
        fleet = client.fleets.get(name)
        got = {i.hostname: i.status for i in fleet.instances}
        if got == want:
            return fleet
        if any(i.status == "unreachable" for i in fleet.instances):
            raise AssertionError(f"unreachable: {[(i.hostname, i.status_message) for i in fleet.instances]}")
        time.sleep(0.5)
    raise AssertionError(f"fleet never reached {want}: {fleet}")


def _agent_pid(net, host) -> int | None:
    out = _ssh(net, host, "cat ~/.dstack/agent/home/agent.json 2>/dev/null")
    return json.loads(out)["pid"] if out.strip() else None


def test_fleet_lifecycle(host_net, tmp_path):
    h0, h1, h2 = host_net.hosts[:3]
    with running_server(tmp_path) as srv:
        client = srv.client()
        plan = client.fleets.get_plan(_conf(host_net, [h0, h1, h2]))
        assert plan["action"] == "create"
        assert [r["action"] for r in plan["hosts"]] == ["add"] * 3
        for row in plan["hosts"]:
            assert not row.get("error"), row
            assert row["probe"]["cpus"] >= 1 and row["probe"]["memory_mib"] > 0 and row["probe"]["disk_mib"] > 0
            assert row["probe"]["hostname"] in {"h0", "h1", "h2"}

        fleet = client.fleets.apply(_conf(host_net, [h0, h1, h2]))
        assert fleet.name == "lab" and len(fleet.instances) == 3
        assert "private" not in json.dumps(fleet.spec).replace('"private": "<hidden>"', "")
        fleet = _wait_status(client, "lab", {h.address: "idle" for h in (h0, h1, h2)})
        assert {i.name for i in fleet.instances} == {"lab-0", "lab-1", "lab-2"}
        assert all(i.backend == "ssh" and i.region == "lab" and i.resources["cpus"] >= 1 for i in fleet.instances)

        pids = {}
        for h in (h0, h1, h2):
            # the agent arrived over SSH into the host's own (private) home, and listens on its loopback only
            assert _ssh(host_net, h, "ls ~/.dstack/agent/bundles/*/.complete").strip()
            pids[h.name] = _agent_pid(host_net, h)
            assert pids[h.name]
            # no systemd on these hosts: the fallback start, its own session (setsid), outliving SSH
            assert _ssh(host_net, h, f"ps -o sid= -p {pids[h.name]}").strip() == str(pids[h.name])
            assert _ssh(host_net, h, "stat -c %a ~/.dstack/agent/token").strip() == "600"
            # unpacked with bytecode for what the agent imports; the archive gone
            assert _ssh(host_net, h, "ls ~/.dstack/agent/bundles/*/dstack/agent/__pycache__/app.*.pyc").strip()
            assert not _ssh(host_net, h, "ls ~/.dstack/agent/bundles/ | grep -v '^[0-9a-f]*$'").strip()
            listeners = h.exec("ss", "-ltnH").stdout
            exposed = [line for line in listeners.splitlines() if h.address in line and ":22 " not in line]
            assert not exposed, listeners
        assert [f.name for f in client.fleets.list()] == ["lab"]

        # re-applying the same hosts changes nothing: same instances, same agents
        client.fleets.apply(_conf(host_net, [h0, h1, h2]))
        fleet = _wait_status(client, "lab", {h.address: "idle" for h in (h0, h1, h2)})
        assert {i.name for i in fleet.instances} == {"lab-0", "lab-1", "lab-2"}
        assert all(_agent_pid(host_net, h) == pids[h.name] for h in (h0, h1, h2))

        # update in place: h2 removed (its agent stopped), the others untouched
        plan = client.fleets.get_plan(_conf(host_net, [h0, h1]))
        assert plan["action"] == "update"
        assert sorted((r["hostname"], r["action"]) for r in plan["hosts"]) == sorted(
            [(h0.address, "keep"), (h1.address, "keep"), (h2.address, "remove")]
        )
        client.fleets.apply(_conf(host_net, [h0, h1]))
        fleet = _wait_status(client, "lab", {h0.address: "idle", h1.address: "idle"})
        bundle_inode = _ssh(host_net, h2, "stat -c %i ~/.dstack/agent/bundles/*/").strip()
        assert bundle_inode
        deadline = time.time() + 20
        while _ssh(host_net, h2, f"kill -0 {pids['h2']} 2>/dev/null && echo alive").strip() and time.time() < deadline:
            time.sleep(0.2)
        assert not _ssh(host_net, h2, f"kill -0 {pids['h2']} 2>/dev/null && echo alive").strip()

        # and added back: its number is free again; the bundle it has is not shipped or unpacked again
        client.fleets.apply(_conf(host_net, [h0, h1, h2]))
        fleet = _wait_status(client, "lab", {h.address: "idle" for h in (h0, h1, h2)})
        assert {i.name for i in fleet.instances} == {"lab-0", "lab-1", "lab-2"}
        assert _ssh(host_net, h2, "stat -c %i ~/.dstack/agent/bundles/*/").strip() == bundle_inode
        assert _agent_pid(host_net, h2) not in (None, pids["h2"])

        fleet = client.fleets.delete_instances("lab", [1])
        assert {i.name for i in fleet.instances} == {"lab-0", "lab-2"}

        client.fleets.delete("lab")
        assert client.fleets.list() == []
        for h in (h0, h1, h2):
            pid = _agent_pid(host_net, h)
            assert pid is None or not _ssh(host_net, h, f"kill -0 {pid} 2>/dev/null && echo alive").strip()
