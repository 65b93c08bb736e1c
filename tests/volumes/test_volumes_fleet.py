"""Volumes on SSH fleet hosts: a named `backend: ssh` volume lives on one host of the fleet (made
there by that host's agent) and runs naming it go to that host, even with another host idle;
instance paths mount on the remote host; a host that does not answer refuses create and delete
with nothing changed. Hosts are network namespaces with their own sshd and private /root
(tests/fleets/hosts.py); one server and one 2-host fleet serve the whole module."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dstack.core.models.fleets import FleetConfiguration
from tests.conftest import ServerProcess, running_server
from tests.fleets.hosts import Host, HostNetwork, hosts_or_skip
from tests.volumes.test_volumes import BASE, _api, _cli, _output, _submit, _wait

pytestmark = pytest.mark.slow
FLEET = "vols"
SMALL = {"cpu": "0..", "memory": "0.1GB..", "disk": "1GB.."}  # the hosts' homes are small tmpfs
AGENT_VOLUMES = "/root/.dstack/agent/home/volumes"  # the remote agent's (backends/ssh/agent.py)


@pytest.fixture(scope="module")
def host_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostNetwork]:
    with hosts_or_skip(tmp_path_factory.mktemp("hosts"), 2) as net:
        yield net


@pytest.fixture(scope="module")
def fleet_server(host_net: HostNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with fleet `vols` of two idle hosts."""
    with running_server(tmp_path_factory.mktemp("server")) as srv:
        client = srv.client()
        conf = FleetConfiguration.model_validate(
            {
                "type": "fleet",
                "name": FLEET,
                "ssh_config": {"identity_file": str(host_net.key), "hosts": [h.address for h in host_net.hosts]},
            }
        )
        client.fleets.apply(conf)
        _wait_idle(srv)
        yield srv


def _wait_idle(srv: ServerProcess, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        instances = srv.client().fleets.get(FLEET).instances
        if all(i.status == "idle" for i in instances):
            return
        assert time.monotonic() < deadline, f"fleet {FLEET} not idle: {instances}"
        time.sleep(0.5)


def _on_host(host: Host, *cmd: str) -> subprocess.CompletedProcess[str]:
    """A command in the host's own mount namespace (its private /root), where its agent runs."""
    assert host.sshd is not None
    return subprocess.run(["nsenter", "-t", str(host.sshd.pid), "-m", "--", *cmd], capture_output=True, text=True)


def _give_cgroups(host: Host) -> None:
    """Mount in the host's namespace the cgroup filesystems this machine has: `ip netns exec`
    mounts a fresh /sys for the host, without /sys/fs/cgroup, and runc needs it for containers."""
    lines = [""]
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f]
    for _, point, fstype, opts, *_ in mounts:
        if not point.startswith("/sys/fs/cgroup") or fstype not in ("cgroup", "cgroup2", "tmpfs"):
            continue
        if fstype == "tmpfs" and point != "/sys/fs/cgroup":
            continue
        flags = ",".join(o for o in opts.split(",") if o not in ("rw", "ro", "relatime", "nosuid", "nodev", "noexec"))
        if flags.startswith("name="):
            flags = "none," + flags  # a named hierarchy without controllers
        lines.append(f"mkdir -p {point} && mount -t {fstype} {'-o ' + flags if flags else ''} {fstype} {point}")
    script = "mountpoint -q /sys/fs/cgroup && exit 0" + "\n".join(lines)
    done = _on_host(host, "sh", "-ec", script)
    assert done.returncode == 0, done.stderr


def _create(srv: ServerProcess, name: str, **extra: Any) -> dict[str, Any]:
    conf = {"type": "volume", "name": name, "backend": "ssh", "region": FLEET, **extra}
    r = _api(srv, f"{BASE}/create", {"configuration": conf})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _run(srv: ServerProcess, name: str, commands: list[str], volumes: list[Any], **extra: Any) -> str:
    r = _submit(srv, name, commands, volumes, resources=SMALL, fleets=[FLEET], **extra)
    assert r.status_code == 200, r.text
    run = _wait(srv, name, ("done", "failed", "terminated"), timeout=120)
    out = _output(srv, name)
    assert run["status"] == "done", (run.get("status"), run.get("termination_reason"), out)
    return out


def test_a_named_volume_keeps_data_on_its_host(fleet_server: ServerProcess, host_net: HostNetwork) -> None:
    srv = fleet_server
    h0, h1 = host_net.hosts
    # Pinned to the second host: runs without volumes would take the first one (idle, listed first).
    f = srv.home / "keep.dstack.yml"
    f.write_text(
        f"type: volume\nname: keep\nbackend: ssh\nregion: {FLEET}\navailability_zone: {h1.address}\nsize: 1GB\n"
    )
    applied = _cli(srv, "apply", "-f", str(f), "-y")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert f"fleet {FLEET}, host {h1.address}" in applied.stdout, applied.stdout
    volume = _api(srv, f"{BASE}/get", {"name": "keep"}).json()
    assert volume["provisioning_data"]["region"] == FLEET
    assert volume["provisioning_data"]["availability_zone"] == h1.address
    where = f"{AGENT_VOLUMES}/{volume['id']}"
    assert _on_host(h1, "test", "-d", where).returncode == 0, "made on its host"
    assert _on_host(h0, "test", "-e", where).returncode != 0, "and only there"
    listing = _cli(srv, "volume")
    assert listing.returncode == 0 and h1.address in listing.stdout and FLEET in listing.stdout, listing.stdout

    # The plan offers only the volume's host.
    conf = {"type": "task", "commands": ["true"], "volumes": ["keep:/data"], "resources": SMALL, "fleets": [FLEET]}
    plan = _api(srv, "/api/project/main/runs/get_plan", {"run_spec": {"configuration": conf}}).json()
    offered = {o["instance_name"] for o in plan["job_plans"][0]["offers"]}
    assert len(offered) == 1, plan["job_plans"][0]

    mark = uuid.uuid4().hex
    out = _run(srv, f"kw-{mark[:6]}", [f"echo {mark} > /data/note.txt", "hostname"], ["keep:/data"])
    assert h1.name in out.split(), out
    out = _run(srv, f"kr-{mark[:6]}", ["cat /vol/note.txt", "hostname"], [{"name": "keep", "path": "/vol"}])
    assert out.split() == [mark, h1.name], out  # the next run, on the same host, reads it

    # The hosts' agents run as root with this machine's tools: where this machine can back a size
    # with an image, so can they, and the runs above wrote through its loop mount.
    from dstack.agent import volume_image

    assert volume["size_enforced"] is (volume_image.why_not_enforced() is None), volume
    if volume["size_enforced"]:
        assert _on_host(h1, "test", "-f", f"{where}.img").returncode == 0
        assert _on_host(h1, "mountpoint", "-q", where).returncode == 0
    assert _api(srv, f"{BASE}/delete", {"names": ["keep"]}).status_code == 200
    assert _on_host(h1, "test", "-e", where).returncode != 0, "delete removes it on the host"
    assert _on_host(h1, "test", "-e", f"{where}.img").returncode != 0


def test_without_a_host_the_first_reachable_one_keeps_it(fleet_server: ServerProcess, host_net: HostNetwork) -> None:
    srv = fleet_server
    volume = _create(fleet_server, "auto")
    assert volume["provisioning_data"]["availability_zone"] == host_net.hosts[0].address
    assert _create(fleet_server, "auto")["id"] == volume["id"]  # applied again unchanged: the same volume
    for conf, text in [
        ({"region": "nofleet"}, "fleet 'nofleet' does not exist in project 'main'"),
        ({"name": "az", "availability_zone": "10.255.255.1"}, "is not a host of fleet 'vols'"),
        ({"name": "reg", "volume_id": "/nonexistent/dir"}, "is not an existing directory on host"),
    ]:
        body = {"type": "volume", "name": "bad", "backend": "ssh", "region": FLEET, **conf}
        r = _api(srv, f"{BASE}/create", {"configuration": body})
        assert r.status_code == 400 and text in r.text, r.text
    names = [v["name"] for v in _api(srv, f"{BASE}/list").json()]
    assert not {"bad", "az", "reg"} & set(names), names
    assert _api(srv, f"{BASE}/delete", {"names": ["auto"]}).status_code == 200


def test_an_instance_path_mounts_on_the_fleet_host(fleet_server: ServerProcess, host_net: HostNetwork) -> None:
    mark = uuid.uuid4().hex
    shared = Path(f"/tmp/dstack-fleet-vol-{mark[:8]}")  # outside /root: the same directory on every host
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # the job runs as an unprivileged user
    try:
        (shared / "in.txt").write_text(f"from-host-{mark}\n")
        os.chmod(shared / "in.txt", 0o644)
        out = _run(
            fleet_server,
            f"ip-{mark[:6]}",
            ["cat /host/in.txt", "echo written > /host/out.txt", "hostname"],
            [f"{shared}:/host"],
        )
        assert f"from-host-{mark}" in out, out
        assert {h.name for h in host_net.hosts} & set(out.split()), out  # it ran on a fleet host
        assert (shared / "out.txt").read_text() == "written\n"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_host_that_does_not_answer_changes_nothing(fleet_server: ServerProcess, host_net: HostNetwork) -> None:
    srv = fleet_server
    h0 = host_net.hosts[0]
    volume = _create(srv, "far", availability_zone=h0.address)
    where = f"{AGENT_VOLUMES}/{volume['id']}"
    host_net.link_down(h0)
    try:
        r = _api(srv, f"{BASE}/delete", {"names": ["far"]})
        assert r.status_code == 503 and "nothing was deleted" in r.text, r.text
        body = {"type": "volume", "name": "near", "backend": "ssh", "region": FLEET, "availability_zone": h0.address}
        r = _api(srv, f"{BASE}/create", {"configuration": body})
        assert r.status_code == 503 and "nothing was created" in r.text, r.text
        names = [v["name"] for v in _api(srv, f"{BASE}/list").json()]
        assert "far" in names and "near" not in names, names
        assert _on_host(h0, "test", "-d", where).returncode == 0
    finally:
        host_net.link_up(h0)
    deadline = time.monotonic() + 90  # the link back: the host's connection answers again (or is re-attached)
    while (r := _api(srv, f"{BASE}/delete", {"names": ["far"]})).status_code == 503 and time.monotonic() < deadline:
        time.sleep(1)
    assert r.status_code == 200, r.text
    assert _on_host(h0, "test", "-e", where).returncode != 0


def test_a_container_on_the_fleet_host_sees_its_volumes(fleet_server: ServerProcess, host_net: HostNetwork) -> None:
    from tests.images import ensure_test_image

    image = ensure_test_image()  # skips, saying why, where podman cannot run it
    h1 = host_net.hosts[1]
    _give_cgroups(h1)
    _create(fleet_server, "boxed", availability_zone=h1.address)
    mark = uuid.uuid4().hex
    shared = Path(f"/tmp/dstack-fleet-box-{mark[:8]}")
    shared.mkdir(mode=0o755)
    try:
        (shared / "in.txt").write_text(f"path-{mark}\n")
        os.chmod(shared / "in.txt", 0o644)
        out = _run(
            fleet_server,
            f"cw-{mark[:6]}",
            [f"echo {mark} > /data/from-container.txt", "cat /host/in.txt"],
            ["boxed:/data", f"{shared}:/host"],
            image=image,
        )
        assert f"path-{mark}" in out, out
        out = _run(fleet_server, f"cr-{mark[:6]}", ["cat /vol/from-container.txt", "hostname"], ["boxed:/vol"])
        assert out.split() == [mark, h1.name], out
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        _api(fleet_server, f"{BASE}/delete", {"names": ["boxed"]})


def test_a_volume_whose_fleet_is_gone_refuses_runs(fleet_server: ServerProcess, host_net: HostNetwork) -> None:
    """Last in the module: it deletes the fleet."""
    srv = fleet_server
    h0 = host_net.hosts[0]
    volume = _create(srv, "orphan", availability_zone=h0.address)
    where = f"{AGENT_VOLUMES}/{volume['id']}"
    srv.client().fleets.delete(FLEET)
    r = _submit(srv, "orphan-run", ["true"], ["orphan:/data"], resources=SMALL)
    assert r.status_code == 400, r.text
    assert f"volume 'orphan' lives on host {h0.address} of fleet '{FLEET}', which is no longer a host" in r.text
    assert _api(srv, f"{BASE}/delete", {"names": ["orphan"]}).status_code == 200  # forgotten...
    assert "orphan" not in [v["name"] for v in _api(srv, f"{BASE}/list").json()]
    assert _on_host(h0, "test", "-d", where).returncode == 0  # ...its data left on the host
