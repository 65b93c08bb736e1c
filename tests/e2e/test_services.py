"""Services end to end: real server, agent, replicas running the upstream apps, the proxy in between."""

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from dstack.api import Resources, RunStatus, Service
from tests.e2e.util import wait_ready
from tests.util import wait_until

# The data plane barely touches the database: these run on SQLite only (the core suite, the CLI
# and serverless queues also run on PostgreSQL).
pytestmark = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


APPS = Path(__file__).parent / "apps"
# The upstream apps are tiny: they hold no dedicated CPU, so many replicas fit on a 2-core host.
SMALL = Resources(cpu="0..1", memory="0.3GB")


def serve(client, name: str, mode: str, **kw) -> "object":
    conf = Service(commands=[f"python upstream.py {mode} 8000"], port=8000, resources=kw.pop("resources", SMALL), **kw)
    run = client.runs.submit(conf, run_name=name, repo_dir=APPS)
    return run


def _answering_replicas(run, server) -> set[str]:
    """Which replicas answer the service's requests, once both of replicas 0 and 1 have."""
    seen: set[str] = set()

    def both() -> bool:
        seen.add(httpx.get(run.service_url, headers=server.headers).json()["replica"])
        return seen == {"0", "1"}

    wait_until(both, 60, 0.05, "both replicas to answer")
    return seen


def _running(run, n: int) -> list:
    """The run's jobs whose latest submission runs, when there are exactly `n` of them (else [])."""
    running = [j for j in run.refresh().jobs if j.job_submissions[-1].status.value == "running"]
    return running if len(running) == n else []


@pytest.fixture(scope="module")
def plain(server):
    client = server.client()
    run = serve(client, "plain-svc", "plain")
    wait_ready(run.service_url, server.headers)
    yield run
    run.stop(abort=True)


def test_passthrough_and_service_url(server, plain):
    assert plain.service_url == f"{server.url}/proxy/services/main/plain-svc/"
    r = httpx.put(plain.service_url + "a/b?x=1&y=2", content=b"payload", headers={**server.headers, "X-Custom": "v"})
    assert r.status_code == 200
    body = r.json()
    assert (body["method"], body["path"], body["query"], body["body"], body["x_custom"]) == (
        "PUT",
        "/a/b",
        "x=1&y=2",
        "payload",
        "v",
    )
    assert body["auth"] is None  # the user's dstack token never reaches user code


def test_auth_matrix(server, plain):
    url = plain.service_url
    r = httpx.get(url)
    assert r.status_code == 401 and "Bearer" in r.text
    r = httpx.get(url, headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code == 403
    client = server.client()
    carol = client.api.post("/api/users/create", {"username": "carol"})
    carol_headers = {"Authorization": f"Bearer {carol['creds']['token']}"}
    assert httpx.get(url, headers=carol_headers).status_code == 403  # not a member of `main`
    client.api.post("/api/projects/main/add_members", {"members": [{"username": "carol"}]})
    # refusals are cached for a moment
    wait_until(lambda: httpx.get(url, headers=carol_headers).status_code == 200, 5, 0.3, "the new member to get in")
    # Revoking the token takes effect within seconds (auth answers are cached briefly).
    client.api.post("/api/users/delete", {"users": ["carol"]})
    wait_until(lambda: httpx.get(url, headers=carol_headers).status_code != 200, 10, 0.5, "the revoked token to fail")


def test_a_submitted_service_answers_503_until_a_replica_is_ready(server):
    """The proxy knows a service as soon as its submit answers: its URL says 503 "no ready replica"
    (with Retry-After), not 404 "not running", also for the same name submitted again right after
    the previous run of it ended."""
    client = server.client()
    for attempt in range(2):
        run = serve(client, "early-svc", "plain")
        r = httpx.get(run.service_url, headers=server.headers)
        assert r.status_code == 503 and "no ready replica" in r.json()["detail"], (attempt, r.status_code, r.text)
        assert r.headers["retry-after"]
        assert wait_ready(run.service_url, server.headers).json()["replica"] == "0"
        run.stop(abort=True)
        wait_until(lambda r=run: r.refresh().status.is_finished(), 60, 0.2, "the run to end")


def test_public_service_with_auth_false(server):
    run = serve(server.client(), "public-svc", "plain", auth=False)
    try:
        r = wait_ready(run.service_url)
        assert r.json()["replica"] == "0"
    finally:
        run.stop(abort=True)


def test_sse_streams_chunk_by_chunk(server):
    run = serve(server.client(), "sse-svc", "sse")
    try:
        wait_ready(run.service_url, server.headers, path="stream?n=1&delay=0")
        t0 = time.time()
        arrivals = []
        with httpx.stream("GET", run.service_url + "stream?n=4&delay=0.4", headers=server.headers, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.time() - t0)
        assert len(arrivals) == 4
        assert arrivals[0] < 1.0, arrivals  # the first chunk came before the upstream finished (~1.6 s)
        assert arrivals[-1] - arrivals[0] > 0.8, arrivals  # and the rest were not buffered
    finally:
        run.stop(abort=True)


def test_replicas_balance_and_killed_replica_is_replaced(server):
    run = serve(server.client(), "two-svc", "plain", replicas=2)
    try:
        wait_ready(run.service_url, server.headers)
        seen = _answering_replicas(run, server)
        assert seen == {"0", "1"}, "both replicas of a fixed port 8000 serve (each in its own network namespace)"
        # Kill replica 0 under traffic.
        results = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    results.append(httpx.get(run.service_url, headers=server.headers, timeout=10).status_code)
                except httpx.HTTPError:
                    results.append(0)

        t = threading.Thread(target=traffic)
        t.start()
        for _ in range(50):
            if httpx.get(run.service_url + "die/0", headers=server.headers).status_code == 200:
                break
        time.sleep(3)  # the traffic that goes on after the kill is what the test measures
        stop.set()
        t.join()
        ok = results.count(200)
        assert ok / len(results) > 0.9, (ok, len(results))
        # The killed replica is replaced by a new submission that serves again.
        wait_until(
            lambda: len(subs := run.refresh().jobs[0].job_submissions) >= 2 and subs[-1].status.value == "running",
            60,
            0.5,
            "the killed replica's new submission to run",
        )
        assert len(run.jobs[0].job_submissions) >= 2
        seen = _answering_replicas(run, server)
        assert seen == {"0", "1"}
    finally:
        run.stop(abort=True)


def test_scale_from_zero_holds_the_first_request(server):
    run = serve(
        server.client(),
        "zero-svc",
        "plain",
        replicas="0..1",
        scaling={"metric": "rps", "target": 1, "scale_up_delay": "0s", "scale_down_delay": "2s"},
    )
    try:
        run.wait(statuses=(RunStatus.RUNNING,), timeout=30)
        assert not [j for j in run.jobs if not j.job_submissions[-1].status.is_finished()]
        t0 = time.time()
        r = httpx.get(run.service_url, headers=server.headers, timeout=120)
        assert r.status_code == 200 and r.json()["replica"] == "0"
        print(f"cold request answered after {time.time() - t0:.2f} s")
        # Idle: back to zero (window 4 s + scale-down delay 2 s).
        wait_until(
            lambda: run.refresh().jobs and all(j.job_submissions[-1].status.is_finished() for j in run.jobs),
            60,
            0.5,
            "the idle service to scale to zero",
        )
        assert all(j.job_submissions[-1].status.is_finished() for j in run.jobs)
        assert run.jobs[0].job_submissions[-1].termination_reason.value == "scaled_down"
    finally:
        run.stop(abort=True)


def test_scale_up_under_load_and_down_when_idle(server):
    run = serve(
        server.client(),
        "auto-svc",
        "plain",
        replicas="1..2",
        scaling={"metric": "rps", "target": 2, "scale_up_delay": "0s", "scale_down_delay": "2s"},
    )
    try:
        wait_ready(run.service_url, server.headers)
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(headers=server.headers) as c:
                while not stop.is_set():
                    c.get(run.service_url + "slow?s=0.05")

        threads = [threading.Thread(target=load) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            running = wait_until(lambda: _running(run, 2), 60, 0.5, "2 running replicas under load")
            assert len(running) == 2, "scaled up to 2 replicas under load"
        finally:
            stop.set()
            for t in threads:
                t.join()
        running = wait_until(lambda: _running(run, 1), 60, 0.5, "1 running replica when idle")
        assert len(running) == 1, "scaled back down to 1 when idle"
    finally:
        run.stop(abort=True)


def test_openai_sdk_against_openai_and_tgi_services(server):
    client = server.client()
    oa = serve(client, "oa-svc", "openai", model={"name": "test/openai-model", "format": "openai"})
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tgi = serve(
        client,
        "tgi-svc",
        "tgi",
        model={"name": "test/tgi-model", "format": "tgi", "chat_template": template, "eos_token": "</s>"},
    )
    try:
        wait_ready(oa.service_url, server.headers, path="v1/models")
        base = f"{server.url}/proxy/models/main/v1"
        assert oa.refresh()._run.service.model.base_url == base
        sdk = openai.OpenAI(base_url=base, api_key=server.token)
        names = sorted(m.id for m in sdk.models.list())
        assert names == ["test/openai-model", "test/tgi-model"]
        for model in ("test/openai-model", "test/tgi-model"):
            deadline = time.time() + 60
            while True:
                try:
                    resp = sdk.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "one two three"}]
                    )
                    break
                except (openai.APIStatusError, openai.APIConnectionError):
                    if time.time() > deadline:
                        raise
                    time.sleep(0.3)
            assert resp.choices[0].message.content == "three two one"
            assert resp.choices[0].finish_reason == "stop"
            chunks = list(
                sdk.chat.completions.create(
                    model=model,
                    stream=True,
                    stream_options={"include_usage": True},
                    messages=[{"role": "user", "content": "alpha beta"}],
                )
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text == "beta alpha"
        usage = [c.usage for c in chunks if c.usage]
        assert usage and usage[-1].completion_tokens == 2
        with pytest.raises(openai.PermissionDeniedError):
            openai.OpenAI(base_url=base, api_key="not-a-token").chat.completions.create(
                model="test/tgi-model", messages=[{"role": "user", "content": "x"}]
            )
        # An upstream TGI error comes back as an OpenAI error object.
        with pytest.raises(openai.APIStatusError) as e:
            sdk.completions.create(model="test/tgi-model", prompt="FAIL")
        assert "generation failed on purpose" in str(e.value)
    finally:
        oa.stop(abort=True)
        tgi.stop(abort=True)


def test_tgi_model_without_template_is_refused(server):
    from dstack.core.errors import ServerClientError

    with pytest.raises(ServerClientError) as e:
        serve(server.client(), "notemplate-svc", "tgi", model={"name": "no-such-local-model", "format": "tgi"})
    assert "model.chat_template" in str(e.value)


def test_metrics_and_ps_show_the_service(server, plain):
    httpx.get(plain.service_url, headers=server.headers)
    r = httpx.get(f"{server.url}/metrics", headers=server.headers)
    assert r.status_code == 200 and "plain-svc" in r.text
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", "ps"], env=server.env, capture_output=True, text=True
    ).stdout
    assert "plain-svc" in out and plain.service_url in out
