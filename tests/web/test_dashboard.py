"""The dashboard in a real headless Chromium against a real server, agent and database."""

import re

import httpx
import pytest
from playwright.sync_api import expect

from dstack.api import Resources, Serverless, Task
from tests.web.conftest import screenshot, sign_in

SMALL = Resources(cpu=0, memory="0.2GB")
TICKER = "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.3; done"


def test_pages_need_a_session(server):
    for path in ("/", "/runs", "/runs/table", "/runs/main/anything"):
        r = httpx.get(server.url + path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/signin", (path, r.status_code)
    r = httpx.get(server.url + "/runs/table", headers={"HX-Request": "true"})
    assert r.status_code == 401 and r.headers["hx-redirect"] == "/signin"


def _session(server, token) -> httpx.Client:
    c = httpx.Client(base_url=server.url)
    r = c.post("/signin", data={"token": token})
    assert r.status_code == 303, r.text
    return c


def test_cookie_holds_no_token_and_posts_need_csrf(server):
    c = _session(server, server.token)
    cookie = c.cookies["dstack_session"]
    assert server.token not in cookie
    set_cookie = httpx.post(server.url + "/signin", data={"token": server.token}).headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie
    r = c.post("/signout", data={})
    assert r.status_code == 403
    r = c.post("/signout", data={"csrf": "forged"})
    assert r.status_code == 403
    page = c.get("/runs").text
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    r = c.post("/signout", data={"csrf": csrf}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    r = c.post("/signout", data={"csrf": csrf})
    assert r.status_code == 303
    # a tampered cookie is no session
    bad = httpx.get(server.url + "/runs", cookies={"dstack_session": cookie[:-2] + "xx"})
    assert bad.status_code == 303


def test_a_user_sees_only_their_projects_and_a_new_token_ends_sessions(server):
    h = server.headers
    r = httpx.post(server.url + "/api/users/create", json={"username": "webuser"}, headers=h)
    assert r.status_code == 200, r.text
    token = r.json()["creds"]["token"]
    r = httpx.post(
        server.url + "/api/projects/create",
        json={"project_name": "webuser-own"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200, r.text
    c = _session(server, token)
    page = c.get("/runs").text
    assert 'value="webuser-own"' in page and 'value="main"' not in page
    assert c.get("/runs/main/some-run", follow_redirects=False).status_code == 404
    instances = c.get("/instances")
    assert instances.status_code == 403 and "only a global admin" in instances.text
    assert 'href="/instances"' not in page
    admin_page = _session(server, server.token).get("/runs").text
    assert 'value="main"' in admin_page
    r = httpx.post(server.url + "/api/users/refresh_token", json={"username": "webuser"}, headers=h)
    assert r.status_code == 200
    assert c.get("/runs", follow_redirects=False).status_code == 303


def test_sign_in_follow_logs_and_stop_a_task(server, page, tmp_path):
    page.goto(server.url + "/runs")
    expect(page).to_have_url(re.compile(r"/signin$"))
    page.get_by_label("Token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")
    screenshot(page, "dashboard-signin.png")
    sign_in(page, server)
    page.evaluate("window.__still_here = 'yes'")  # gone if the page reloads

    (tmp_path / "repo").mkdir()
    run = server.client().runs.submit(
        Task(commands=[TICKER], resources=SMALL), run_name="web-ticker", repo_dir=tmp_path / "repo"
    )
    table = page.get_by_role("table", name="Runs")
    row = table.get_by_role("row").filter(has=page.get_by_role("link", name="web-ticker"))
    expect(row).to_be_visible(timeout=30_000)  # appeared by polling, without a reload
    expect(row).to_contain_text("running", timeout=90_000)
    assert page.evaluate("window.__still_here") == "yes"
    screenshot(page, "dashboard-runs.png")

    page.get_by_role("link", name="Instances").click()
    hosts = page.get_by_role("table", name="Instances")
    expect(hosts.get_by_role("link", name="main/web-ticker")).to_be_visible()  # what runs where
    page.go_back()

    page.get_by_role("link", name="web-ticker").click()
    page.wait_for_url("**/runs/main/web-ticker")
    page.evaluate("window.__still_here = 'yes'")
    log = page.get_by_label("Log output")
    expect(log).to_contain_text("tick-3", timeout=60_000)
    first = _last_tick(log.inner_text())
    expect(log).to_contain_text(f"tick-{first + 5}", timeout=30_000)  # advanced as written
    assert page.evaluate("window.__still_here") == "yes"

    page.get_by_label("Search logs").fill("tick-2")
    expect(log).not_to_contain_text("tick-3\n")
    expect(log).to_contain_text("tick-2")
    page.get_by_label("Search logs").fill("")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download logs").click()
    assert "tick-1\n" in open(download.value.path()).read()
    screenshot(page, "dashboard-run.png")

    page.get_by_role("link", name="Stop", exact=True).click()
    expect(page.get_by_role("heading", name="Stop run web-ticker?")).to_be_visible()
    page.get_by_role("button", name="Stop run").click()
    page.wait_for_url("**/runs/main/web-ticker")
    expect(page.get_by_text(re.compile(r"^(terminating|terminated)$")).first).to_be_visible(timeout=60_000)
    expect(page.get_by_test_id("run-status")).to_have_text("terminated", timeout=90_000)
    expect(page.get_by_text("stopped_by_user")).to_be_visible()
    assert run.refresh().status.value == "terminated"


def _last_tick(text: str) -> int:
    ticks = re.findall(r"tick-(\d+)", text)
    assert ticks, text[-500:]
    return int(ticks[-1])


def test_serverless_queue_depth_moves_as_test_jobs_are_sent(server, page, tmp_path):
    # the worker never starts taking jobs, so each job sent stays in the queue
    (tmp_path / "ep").mkdir()
    conf = Serverless(commands=["sleep 3600"], resources=SMALL, workers="0..1")
    server.client().runs.submit(conf, run_name="web-endpoint", repo_dir=tmp_path / "ep")
    sign_in(page, server)
    page.goto(server.url + "/runs/main/web-endpoint")
    depth = page.get_by_test_id("queue-depth")
    expect(depth).to_have_text("0", timeout=30_000)
    for n in (1, 2, 3):
        page.get_by_role("button", name="Send test job").click()
        expect(page.get_by_role("status")).to_contain_text("Sent job")
        expect(depth).to_have_text(str(n), timeout=15_000)
    page.get_by_label("Job input (JSON)").fill("{not json")
    page.get_by_role("button", name="Send test job").click()
    expect(page.get_by_role("status")).to_contain_text("not valid JSON")
    expect(page.get_by_role("table", name="Recent jobs").get_by_role("row")).to_have_count(4)
    chart = page.get_by_role("img", name="Queue depth over time")
    expect(chart).to_have_attribute("data-last", "3", timeout=10_000)  # the plot's newest point
    assert int(chart.get_attribute("data-points")) >= 3
    screenshot(page, "dashboard-endpoint.png", full_page=True)

    # a member of another project cannot send jobs to this endpoint through their own project's path
    r = httpx.post(server.url + "/api/users/create", json={"username": "web-outsider"}, headers=server.headers)
    token = r.json()["creds"]["token"]
    r = httpx.post(
        server.url + "/api/projects/create",
        json={"project_name": "outsider-proj"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 200, r.text
    c = _session(server, token)
    csrf = re.search(r'name="csrf" value="([^"]+)"', c.get("/runs").text).group(1)
    for path in ("/runs/outsider-proj/web-endpoint/test-job", "/runs/main/web-endpoint/test-job"):
        r = c.post(path, data={"csrf": csrf, "input": "{}"})
        assert r.status_code in (403, 404), (path, r.status_code, r.text)
    expect(depth).to_have_text("3")


@pytest.mark.parametrize("width", [390])
def test_phone_width_controls_have_names(server, browser, width):
    context = browser.new_context(viewport={"width": width, "height": 844})
    page = context.new_page()
    try:
        sign_in(page, server)
        for role, name in (
            ("combobox", "Project"),
            ("combobox", "Status"),
            ("combobox", "Type"),
            ("searchbox", "Name"),
            ("button", "Sign out"),
        ):
            expect(page.get_by_role(role, name=name)).to_be_visible()
        scroll = page.evaluate("document.documentElement.scrollWidth")
        assert scroll <= width + 1, f"the runs page is {scroll}px wide at a {width}px viewport"
        screenshot(page, "dashboard-phone.png")
        page.get_by_role("button", name="Sign out").click()
        page.wait_for_url("**/signin")
        page.goto(server.url + "/runs")
        expect(page).to_have_url(re.compile(r"/signin$"))
    finally:
        context.close()


def test_runs_list_filters(server, tmp_path):
    (tmp_path / "repo").mkdir()
    run = server.client().runs.submit(
        Task(commands=["true"], resources=SMALL), run_name="web-filter-task", repo_dir=tmp_path / "repo"
    )
    c = _session(server, server.token)

    def names(**params) -> str:
        r = c.get("/runs/table", params={"status": "all", **params}, headers={"HX-Request": "true"})
        assert r.status_code == 200, r.text
        return r.text

    assert "web-filter-task" in names(type="task")
    assert "web-filter-task" not in names(type="service")
    assert "web-filter-task" in names(name="filter-ta")
    assert "web-filter-task" not in names(name="filter_ta")  # _ is a literal, not a wildcard
    assert "web-filter-task" in names(project="main")
    assert "web-filter-task" not in names(project="no-such-project")
    run.wait(timeout=60)
    assert "web-filter-task" in names(status="finished")
    assert "web-filter-task" not in names(status="active")


def _csrf(c: httpx.Client) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', c.get("/projects").text).group(1)


def test_projects_page_creates_projects_and_adds_members(server):
    admin = _session(server, server.token)
    csrf = _csrf(admin)
    r = admin.post("/projects/create", data={"csrf": csrf, "project_name": "web-proj"})
    assert r.status_code == 200 and "Created project web-proj." in r.text
    r = admin.post("/projects/create", data={"csrf": csrf, "project_name": "web-proj"})
    assert "Not created:" in r.text and "already exists" in r.text
    r = admin.post("/projects/create", data={"csrf": csrf, "project_name": "bad name!"})
    assert "Not created:" in r.text
    assert admin.post("/projects/create", data={"project_name": "no-csrf"}).status_code == 403

    r = httpx.post(server.url + "/api/users/create", json={"username": "web-member"}, headers=server.headers)
    member_token = r.json()["creds"]["token"]
    r = admin.post("/projects/web-proj/members/add", data={"csrf": csrf, "username": "web-member"})
    assert "web-member is now a user of web-proj." in r.text
    r = admin.post("/projects/web-proj/members/add", data={"csrf": csrf, "username": "nobody-here"})
    assert "Not added:" in r.text and "not found" in r.text

    member = _session(server, member_token)
    page = member.get("/projects").text
    assert "web-proj" in page and "Add member to web-proj" not in page  # a plain member cannot manage
    r = member.post("/projects/web-proj/members/add", data={"csrf": _csrf(member), "username": "web-member"})
    assert "Not added:" in r.text
    assert 'value="web-proj"' in member.get("/runs").text


def test_replacing_my_token_shows_the_new_one_once_and_keeps_this_session(server):
    r = httpx.post(server.url + "/api/users/create", json={"username": "web-rotator"}, headers=server.headers)
    old_token = r.json()["creds"]["token"]
    c = _session(server, old_token)
    old_cookie = c.cookies["dstack_session"]
    r = c.post("/account/token", data={"csrf": _csrf(c)})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    new_token = re.search(r'id="new-token" readonly value="([^"]+)"', r.text).group(1)
    assert new_token != old_token and new_token not in c.cookies["dstack_session"]

    def me(token: str) -> int:
        return httpx.post(
            server.url + "/api/users/get_my_user", headers={"Authorization": f"Bearer {token}"}
        ).status_code

    assert me(old_token) == 401 and me(new_token) == 200
    assert c.get("/projects", follow_redirects=False).status_code == 200  # this browser's new session
    assert "new-token" not in c.get("/projects").text  # shown once
    stale = httpx.get(server.url + "/runs", cookies={"dstack_session": old_cookie})
    assert stale.status_code == 303  # sessions made with the old token ended
