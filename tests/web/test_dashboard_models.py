"""The dashboard's service page and chat playground with a real model (SmolLM2 on the built-in engine)."""

import re
import threading
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from dstack.api import CompletionService, Resources, Service
from tests.e2e.util import wait_ready
from tests.web.conftest import screenshot, sign_in

# the data plane barely touches the database: SQLite only, as in tests/e2e/test_text_generation.py
pytestmark = pytest.mark.parametrize("server", ["sqlite"], indirect=True)

MODEL = "SmolLM2-135M-Instruct"
APPS = Path(__file__).resolve().parents[1] / "e2e" / "apps"


@pytest.fixture(scope="module")
def smol(server):
    run = server.client().runs.submit(
        CompletionService(model_name=MODEL), run_name="web-smol", resources=Resources(cpu=1, memory="1GB")
    )
    wait_ready(run.service_url, server.headers, timeout=240, path="health")
    yield run.refresh()
    run.stop(abort=True)


@pytest.mark.timeout(600)  # the engine decodes slowly when the shared host is loaded
def test_chat_playground_streams_an_answer_through_the_proxy(server, smol, page):
    sign_in(page, server)
    page.goto(server.url + "/runs/main/web-smol")
    expect(page.get_by_test_id("replicas-ready")).to_have_text("1 of 1", timeout=60_000)
    expect(page.get_by_role("heading", name="Chat playground")).to_be_visible()
    requests = []
    page.on("request", lambda r: requests.append(r.url) if "/chat/completions" in r.url else None)

    page.get_by_label("API token").fill("wrong-token")
    page.get_by_label("Message").fill("What is the capital of France?")
    page.get_by_role("button", name="Send message").click()
    conversation = page.get_by_role("log", name="Conversation")
    expect(conversation.locator("[data-role=assistant][data-done]")).to_contain_text(re.compile(r"error: 40[13]"))

    page.get_by_label("API token").fill(server.token)
    page.get_by_label("Max new tokens").fill("8")  # a shared 2-core host decodes slowly under load
    page.get_by_label("Message").fill("What is the capital of France?")
    page.get_by_role("button", name="Send message").click()
    answer = conversation.locator("[data-role=assistant]").nth(1)
    expect(answer).to_have_attribute("data-done", "1", timeout=240_000)
    text = answer.inner_text()
    assert re.sub(r"^Model:\s*", "", text).strip() and "error" not in text, text
    assert requests and all("/proxy/models/main/v1/chat/completions" in u for u in requests)

    # the proxy counted the requests: the service's numbers show them
    page.reload()
    expect(page.get_by_text("Requests/s (1 min)")).to_be_visible()
    rps = page.locator("dt:has-text('Requests/s (1 min)') + dd").inner_text()
    assert float(rps) > 0, rps
    screenshot(page, "dashboard-service.png")


def test_service_scaling_from_one_to_two_replicas_shows(server, page):
    conf = Service(
        commands=["python upstream.py plain 8000"],
        port=8000,
        resources=Resources(cpu=0, memory="0.2GB"),
        replicas="1..2",
        scaling={"metric": "rps", "target": 2, "scale_up_delay": "0s", "scale_down_delay": "2s"},
    )
    run = server.client().runs.submit(conf, run_name="web-scaling", repo_dir=APPS)
    stop = threading.Event()
    threads = []
    try:
        wait_ready(run.service_url, server.headers)
        sign_in(page, server)
        page.goto(server.url + "/runs/main/web-scaling")
        page.evaluate("window.__still_here = 'yes'")
        ready = page.get_by_test_id("replicas-ready")
        expect(ready).to_have_text("1 of 1", timeout=30_000)

        def load() -> None:
            with httpx.Client(headers=server.headers) as c:
                while not stop.is_set():
                    c.get(run.service_url + "slow?s=0.05")

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        expect(ready).to_have_text("2 of 2", timeout=90_000)  # polled in, no reload
        assert page.evaluate("window.__still_here") == "yes"
        rps = page.locator("dt:has-text('Requests/s (1 min)') + dd").inner_text()
        assert float(rps) > 0, rps
        expect(page.get_by_role("img", name="Ready replicas over time")).to_have_attribute("data-last", "2")
        screenshot(page, "dashboard-service-scaling.png", full_page=True)
    finally:
        stop.set()
        for t in threads:
            t.join()
        run.stop(abort=True)
