"""The dashboard's Fleets pages in a real Chromium, against a real server and one namespaced SSH host
(tests/fleets/hosts.py): a fleet applied through the API shows with its host and state, a task on the
host shows there with its usage, deleting a busy fleet is refused, and deleting its host and
then the fleet after the confirmations removes them. A member of another project sees none of it."""

import re
import time

import httpx
import pytest
from playwright.sync_api import expect

from dstack.api import Resources, RunStatus, Task
from dstack.core.models.fleets import FleetConfiguration
from tests.conftest import running_server
from tests.fleets.hosts import hosts_or_skip
from tests.web.conftest import screenshot, sign_in

pytestmark = pytest.mark.slow
SMALL = Resources(cpu="0..", memory="0.1GB..", disk="1GB..")  # the host's home is a small tmpfs
TICKER = "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.3; done"


@pytest.fixture
def one_host(tmp_path):
    with hosts_or_skip(tmp_path / "hosts", 1) as net:
        yield net


def _session(server, token) -> httpx.Client:
    c = httpx.Client(base_url=server.url)
    r = c.post("/signin", data={"token": token})
    assert r.status_code == 303, r.text
    return c


def _wait_idle(client, name):
    deadline = time.time() + 180
    while time.time() < deadline:
        fleet = client.fleets.get(name)
        if fleet.instances and all(i.status == "idle" for i in fleet.instances):
            return fleet
        time.sleep(0.5)
    raise AssertionError(f"fleet {name} not idle: {client.fleets.get(name)}")


def test_fleet_hosts_runs_and_delete(one_host, tmp_path, page):
    host = one_host.hosts[0]
    with running_server(tmp_path / "srv") as srv:
        client = srv.client()
        conf = FleetConfiguration.model_validate(
            {
                "type": "fleet",
                "name": "webfleet",
                "ssh_config": {"identity_file": str(one_host.key), "hosts": [host.address]},
            }
        )
        client.fleets.apply(conf)
        sign_in(page, srv)
        page.get_by_role("link", name="Fleets").click()
        page.wait_for_url("**/fleets")
        hosts = page.get_by_role("table", name="Hosts of fleet webfleet")
        row = hosts.get_by_role("row").filter(has_text="webfleet-0")
        expect(row).to_contain_text(f"root@{host.address}:22")
        expect(row).to_contain_text(re.compile(r"provisioning|idle"))
        _wait_idle(client, "webfleet")
        expect(row).to_contain_text("idle", timeout=30_000)  # by polling, without a reload
        expect(row).to_contain_text(re.compile(r"\d+xCPU, \d+GB"))  # the resources the probe found

        # a member of another project sees neither the fleet nor its page, and cannot delete it
        r = httpx.post(srv.url + "/api/users/create", json={"username": "other"}, headers=srv.headers)
        other = _session(srv, r.json()["creds"]["token"])
        assert "webfleet" not in other.get("/fleets").text
        assert other.get("/fleets/main/webfleet").status_code == 404
        csrf = re.search(r'name="csrf" value="([^"]+)"', other.get("/fleets").text).group(1)
        assert other.post("/fleets/main/webfleet/delete", data={"csrf": csrf}).status_code == 404
        assert client.fleets.get("webfleet").name == "webfleet"

        # a task on the host shows there, linked, with its usage from the metrics store
        (tmp_path / "repo").mkdir()
        run = client.runs.submit(
            Task(commands=[TICKER], fleets=["webfleet"], resources=SMALL),
            run_name="on-fleet",
            repo_dir=tmp_path / "repo",
        )
        expect(row.get_by_role("link", name="on-fleet")).to_be_visible(timeout=90_000)
        expect(row).to_contain_text("running", timeout=60_000)
        expect(row).to_contain_text(re.compile(r"CPU \d+%, memory \d+MB"), timeout=60_000)
        expect(row).to_contain_text("busy")

        # the fleet's page: deleting while the task runs is refused by the service's own check
        page.get_by_role("link", name="webfleet", exact=True).click()
        page.wait_for_url("**/fleets/main/webfleet")
        expect(page.get_by_role("link", name="Delete instance webfleet-0")).to_be_visible()
        screenshot(page, "dashboard-fleet.png")
        page.get_by_role("link", name="Delete fleet webfleet").click()
        expect(page.get_by_role("heading", name="Delete fleet webfleet?")).to_be_visible()
        page.get_by_role("button", name="Delete fleet").click()
        expect(page.get_by_role("status")).to_contain_text("active jobs")
        assert client.fleets.get("webfleet").name == "webfleet"

        run.stop(abort=True)
        deadline = time.time() + 90
        while run.refresh().status != RunStatus.TERMINATED and time.time() < deadline:
            time.sleep(0.5)
        assert run.status == RunStatus.TERMINATED, run.status
        _wait_idle(client, "webfleet")

        # at phone width the page fits and the controls are reachable
        page.set_viewport_size({"width": 390, "height": 800})
        page.goto(srv.url + "/fleets/main/webfleet")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        page.get_by_role("link", name="Delete instance webfleet-0").click()
        expect(page.get_by_role("heading", name="Delete instance webfleet-0 from fleet webfleet?")).to_be_visible()
        page.get_by_role("button", name="Delete instance").click()
        page.wait_for_url("**/fleets/main/webfleet")
        expect(page.get_by_role("table", name="Hosts of fleet webfleet")).to_contain_text("No hosts.")
        assert client.fleets.get("webfleet").instances == []
        page.get_by_role("link", name="Delete fleet webfleet").click()
        expect(page.get_by_role("heading", name="Delete fleet webfleet?")).to_be_visible()
        page.get_by_role("button", name="Delete fleet").click()
        page.wait_for_url("**/fleets")
        expect(page.get_by_role("table", name="Hosts of fleet webfleet")).to_have_count(0)
        assert [f.name for f in client.fleets.list()] == []
