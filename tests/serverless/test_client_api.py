"""The client API over plain HTTP against real SDK workers (sync, async, generator handlers)."""

import http.server
import json
import threading
import time

import httpx
import pytest

from .helpers import TOKEN, wait_until


def test_sync_handler_echo_and_scalar(server):
    job = server.run("ep-sync", {"mode": "echo", "value": [1, "two"]})
    st = server.wait("ep-sync", job)
    assert st["status"] == "COMPLETED"
    assert st["output"]["echo"] == [1, "two"]
    assert st["workerId"].startswith("ep-sync-")
    assert isinstance(st["delayTime"], int) and isinstance(st["executionTime"], int)
    st = server.wait("ep-sync", server.run("ep-sync", {"mode": "scalar", "value": 7}))
    assert st["output"] == 7


def test_handler_exception_is_failed_with_error(server):
    st = server.wait("ep-sync", server.run("ep-sync", {"mode": "raise", "value": "x"}))
    assert st["status"] == "FAILED"
    err = json.loads(st["error"])
    assert err["error_type"] == "<class 'ValueError'>" and err["error_message"] == "boom x"
    st = server.wait("ep-sync", server.run("ep-sync", {"mode": "error_dict"}))
    assert st["status"] == "FAILED" and st["error"] == "handled failure" and st["output"] == {"partial": 1}


def test_progress_update_then_final_wins(server):
    job = server.run("ep-sync", {"mode": "progress", "seconds": 2})
    st = server.wait("ep-sync", job, timeout=20, statuses=("IN_PROGRESS",))
    st = wait_until(lambda: (s := server.status("ep-sync", job)).get("output") and s, what="progress output")
    assert st["status"] in ("IN_PROGRESS", "COMPLETED")
    if st["status"] == "IN_PROGRESS":
        assert st["output"] == {"step": "half"}
    st = server.wait("ep-sync", job)
    assert st["status"] == "COMPLETED" and st["output"] == "done"
    time.sleep(0.5)  # a late progress post must not reopen it
    assert server.status("ep-sync", job)["status"] == "COMPLETED"


def test_async_handler_runs_jobs_concurrently(server):
    jobs = [server.run("ep-async", {"mode": "sleep", "seconds": 1.5}) for _ in range(4)]
    results = [server.wait("ep-async", j) for j in jobs]
    assert all(r["status"] == "COMPLETED" for r in results)
    starts = sorted(r["output"]["started"] for r in results)
    # concurrency_modifier=4: all four ran at once (the SDK may take them in two polls)
    assert starts[-1] - starts[0] < 1.4, starts
    assert max(r["output"]["active_at_start"] for r in results) >= 2


@pytest.mark.parametrize("ep,event_loops", [("ep-async", True), ("ep-stock", False)])
def test_event_driven_job_loops_and_the_stock_ones(server, ep, event_loops):
    """Workers dstack starts run the SDK with event-driven job loops unless DSTACK_RUNPOD_LOOP=0;
    either way concurrent jobs complete with the handler's output."""
    assert server.wait(ep, server.run(ep, {"mode": "loops"}))["output"] == {"event_loops": event_loops}
    outs = [server.wait(ep, j) for j in [server.run(ep, {"mode": "sleep", "seconds": 0.3}) for _ in range(8)]]
    assert [o["status"] for o in outs] == ["COMPLETED"] * 8
    assert max(o["output"]["active_at_start"] for o in outs) <= 4  # the concurrency_modifier holds


def test_generator_stream_and_aggregate(server):
    job = server.run("ep-gen", {"n": 5, "delay": 0.2})
    seen = []
    deadline = time.time() + 20
    while time.time() < deadline:
        r = server.client.get(f"/ep-gen/stream/{job}").json()
        assert "stream" in r
        seen += [c["output"] for c in r["stream"]]
        if r["status"] == "COMPLETED" and not r["stream"]:
            break
        time.sleep(0.1)
    assert seen == [{"chunk": i} for i in range(5)]  # each chunk handed out once, in order
    st = server.status("ep-gen", job)
    assert st["status"] == "COMPLETED" and st["output"] == [{"chunk": i} for i in range(5)]


def test_async_generator_without_aggregate(server):
    job = server.run("ep-agen", {"n": 3})
    st = server.wait("ep-agen", job)
    assert st["status"] == "COMPLETED" and st["output"] == []
    r = server.client.get(f"/ep-agen/stream/{job}").json()
    assert [c["output"] for c in r["stream"]] == ["token-0", "token-1", "token-2"]
    assert server.client.get(f"/ep-agen/stream/{job}").json()["stream"] == []


def test_cancel_queued_and_running(server):
    running = server.run("ep-async", {"mode": "sleep", "seconds": 30})
    server.wait("ep-async", running, statuses=("IN_PROGRESS",))
    r = server.client.post(f"/ep-async/cancel/{running}")
    assert r.json() == {"id": running, "status": "CANCELLED"}
    # queued: the sync worker is busy with a sleep, so the next job waits
    blocker = server.run("ep-sync", {"mode": "sleep", "seconds": 1.5})
    queued = server.run("ep-sync", {"mode": "echo", "value": 1})
    assert server.client.post(f"/ep-sync/cancel/{queued}").json() == {"id": queued, "status": "CANCELLED"}
    assert server.wait("ep-sync", blocker)["status"] == "COMPLETED"
    time.sleep(1.5)
    assert server.status("ep-sync", queued)["status"] == "CANCELLED"
    assert server.status("ep-async", running)["status"] == "CANCELLED"
    # cancelling a finished job changes nothing
    assert server.client.post(f"/ep-sync/cancel/{blocker}").json()["status"] == "COMPLETED"


def test_execution_timeout(server):
    job = server.run("ep-timeout", {"mode": "sleep", "seconds": 20}, policy={"executionTimeout": 1000})
    st = server.wait("ep-timeout", job, timeout=40)
    assert st["status"] == "TIMED_OUT" and "execution timeout" in st["error"]
    assert 900 <= st["executionTime"] < 5000


def test_ttl_expiry_and_purge(server):
    # lowPriority jobs don't start workers on a zero-minimum endpoint: they stay queued
    short = server.run("ep-idle", {"mode": "echo"}, policy={"ttl": 800, "lowPriority": True})
    keep = [server.run("ep-idle", {"mode": "echo"}, policy={"lowPriority": True}) for _ in range(3)]
    assert server.status("ep-idle", short)["status"] == "IN_QUEUE"
    time.sleep(1.2)
    assert server.client.get(f"/ep-idle/status/{short}").status_code == 404
    assert server.health("ep-idle")["workers"]["initializing"] + server.health("ep-idle")["workers"]["ready"] == 0
    r = server.client.post("/ep-idle/purge-queue")
    assert r.json() == {"removed": 3, "status": "completed"}
    assert server.client.get(f"/ep-idle/status/{keep[0]}").status_code == 404


def test_retry_failed_job(server, tmp_path):
    job = server.run("ep-async", {"mode": "flaky", "marker": str(tmp_path / "marker")})
    assert server.wait("ep-async", job)["status"] == "FAILED"
    before = server.health("ep-async")["jobs"]["retried"]
    assert server.client.post(f"/ep-async/retry/{job}").json() == {"id": job, "status": "IN_QUEUE"}
    st = server.wait("ep-async", job)
    assert st["status"] == "COMPLETED" and st["output"] == "second attempt works"
    assert server.health("ep-async")["jobs"]["retried"] == before + 1
    r = server.client.post(f"/ep-async/retry/{job}")
    assert r.status_code == 400 and "only FAILED or TIMED_OUT" in r.json()["detail"][0]["msg"]


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list = []
    fail_first = True

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Hook.received.append(body)
        code = 500 if _Hook.fail_first and len(_Hook.received) == 1 else 200
        self.send_response(code)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_with_retry(server):
    hook = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{hook.server_address[1]}/hook?x=1"
        job = server.run("ep-sync", {"mode": "echo", "value": "hooked"}, webhook=url)
        assert server.wait("ep-sync", job)["status"] == "COMPLETED"
        wait_until(lambda: len(_Hook.received) >= 2, timeout=10, what="webhook retry")
        time.sleep(0.8)
        assert len(_Hook.received) == 2  # failed once, delivered on the first retry, then no more
        body = _Hook.received[-1]
        assert body["id"] == job and body["status"] == "COMPLETED" and body["output"]["echo"] == "hooked"
    finally:
        hook.shutdown()


def test_runsync_in_time_and_fallback(server):
    r = server.client.post("/ep-sync/runsync", json={"input": {"mode": "echo", "value": "now"}})
    body = r.json()
    assert body["status"] == "COMPLETED" and body["output"]["echo"] == "now" and body["id"]
    r = server.client.post("/ep-sync/runsync?wait=300", json={"input": {"mode": "sleep", "seconds": 1.5}})
    body = r.json()
    assert body["status"] in ("IN_QUEUE", "IN_PROGRESS") and body["id"]
    assert server.wait("ep-sync", body["id"])["output"] == {"slept": 1.5}


def test_bad_requests_and_auth(server):
    c = server.client
    assert c.post("/ep-sync/run", json={"nope": 1}).status_code == 400
    assert c.post("/ep-sync/run", content=b"{not json").status_code == 400
    assert c.post("/ep-sync/run", json={"input": 1, "policy": {"ttl": -5}}).status_code == 400
    assert c.post("/ep-sync/runsync?wait=abc", json={"input": 1}).status_code == 400
    assert c.get("/ep-sync/status/does-not-exist").status_code == 404
    r = c.get("/ep-sync/no-such-action")
    assert r.status_code == 404 and "no such route" in r.json()["detail"][0]["msg"]
    r = c.get("/ep-sync/run")
    assert r.status_code == 405 and "POST" in r.json()["detail"][0]["msg"]
    assert c.get("/ep-sync/job-take-batch/w1?batch_size=lots", headers={"Authorization": TOKEN}).status_code in (
        400,
        403,
    )
    anon = httpx.Client(base_url=server.url + "/v2")
    r = anon.post("/ep-sync/run", json={"input": 1})
    assert r.status_code == 401 and r.json()["detail"][0]["code"] == "not_authenticated"
    assert anon.post("/ep-sync/run", json={"input": 1}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    outsider = {"Authorization": f"Bearer {TOKEN}-outsider"}
    assert anon.post("/ep-sync/run", json={"input": 1}, headers=outsider).status_code == 404
    assert c.post("/no-such-endpoint/run", json={"input": 1}).status_code == 404
    # the worker protocol wants the endpoint's worker token, not a user token
    assert anon.get("/ep-sync/job-take/w1?x=1").status_code == 401
    assert anon.get("/ep-sync/job-take/w1?x=1", headers={"Authorization": TOKEN}).status_code == 403
    anon.close()


def test_cors(server):
    anon = httpx.Client(base_url=server.url + "/v2")
    r = anon.options(
        "/ep-sync/run",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert r.status_code == 204
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = server.client.get("/ep-sync/health", headers={"Origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = anon.post("/ep-sync/run", json={"input": 1}, headers={"Origin": "https://app.example"})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
    anon.close()


def test_health_shape(server):
    h = server.health("ep-sync")
    assert set(h["jobs"]) == {"completed", "failed", "inProgress", "inQueue", "retried"}
    assert {"idle", "running", "initializing"} <= set(h["workers"])
    assert h["workers"]["idle"] + h["workers"]["running"] >= 1


def test_openai_route(server):
    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
    r = server.client.post("/ep-gen/openai/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "HELLO THERE"
    assert r.json()["route"] == "/v1/chat/completions"
    with server.client.stream("POST", "/ep-gen/openai/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    words = "".join(json.loads(line[6:])["choices"][0]["delta"]["content"] for line in lines[:-1])
    assert words == "hello there "


def test_openai_client_library(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.url}/v2/ep-gen/openai/v1", api_key=TOKEN)
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b"}])
    assert out.choices[0].message.content == "A B"
    chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "a b "


def test_refresh_worker_replaces_the_worker_after_its_job(server):
    """A handler that returns `refresh_worker: True` gets its result kept and its worker replaced:
    the next job runs on a new worker (the endpoint keeps its one warm worker)."""
    first = server.wait("ep-sync", server.run("ep-sync", {"mode": "refresh"}))
    assert first["status"] == "COMPLETED" and first["output"]["worker"] == first["workerId"]
    old = first["workerId"]
    nxt = server.wait("ep-sync", server.run("ep-sync", {"mode": "echo", "value": 7}), timeout=60)
    assert nxt["status"] == "COMPLETED" and nxt["output"]["echo"] == 7
    assert nxt["workerId"] != old
