"""Serverless endpoints end to end: the real server, workers as real dstack jobs running unmodified
RunPod handlers (runpod==1.12.0 installed by the job's setup), the runpod SDK, curl-style HTTP, the
openai SDK, and scaling 0 -> N -> 0."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from dstack.api import Resources, RunStatus, Serverless, Task
from tests.serverless.helpers import live_workers, wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "serverless"
SETUP = ["pip install -q runpod==1.12.0"]
# cpu=0 reserves no core: the test host may have two, and up to five workers run at once here
SMALL = Resources(cpu=0, memory="0.3GB")
COLD = 240  # the first worker also pays the pip install (later ones reuse the prepared venv)

HANDLER = """
import asyncio
import os

import runpod


async def handler(job):
    inp = job["input"]
    if inp.get("mode") == "sleep":
        await asyncio.sleep(inp.get("seconds", 1))
    if inp.get("mode") == "fail":
        raise ValueError("asked to fail")
    from runpod.serverless.modules import rp_scale

    return {"echo": inp.get("value"), "worker": os.environ["RUNPOD_POD_ID"],
            "event_loops": bool(getattr(rp_scale.JobScaler, "dstack_event_loops", False))}


runpod.serverless.start({"handler": handler})
"""

GEN_HANDLER = """
import asyncio

import runpod


async def handler(job):
    inp = job["input"]
    for i in range(inp.get("n", 3)):
        await asyncio.sleep(inp.get("delay", 0.05))
        yield f"token-{i}"


runpod.serverless.start({"handler": handler})
"""


def submit(server, tmp_path_factory, name: str, source: str, **kw):
    repo = tmp_path_factory.mktemp(name)
    (repo / "handler.py").write_text(source)
    conf = Serverless(setup=SETUP, commands=["python handler.py"], resources=SMALL, **kw)
    return server.client().runs.submit(conf, run_name=name, repo_dir=repo)


def health(server, run) -> dict:
    r = httpx.get(f"{run.endpoint_url}/health", headers=server.headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def ps(server) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", "ps"],
        env={**server.env, "COLUMNS": "250"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def sdk(server):
    """The runpod SDK's client aimed at this server (its base URL is read from the environment at
    import; the module attribute is what `runpod.Endpoint` reads, so set both)."""
    os.environ["RUNPOD_ENDPOINT_BASE_URL"] = f"{server.url}/v2"
    import runpod

    runpod.endpoint_url_base = f"{server.url}/v2"
    runpod.api_key = server.token
    return runpod


@pytest.fixture(scope="module")
def smol(server):
    """The SmolLM2 example endpoint, applied from its YAML at the start of the module with one
    warm-up job, so its worker loads the model while the other tests run."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "dstack.cli.main",
            "apply",
            "-f",
            str(EXAMPLES / "smollm2.dstack.yml"),
            "-y",
            "-d",
            "-n",
            "sls-smol",
        ],
        env=server.env,
        cwd=EXAMPLES,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    run = server.client().runs.get("sls-smol")
    assert run.endpoint_url and run.endpoint_url in out.stdout
    r = httpx.post(
        f"{run.endpoint_url}/run",
        headers=server.headers,
        timeout=10,
        json={"input": {"prompt": "Hi", "parameters": {"max_new_tokens": 2}}},
    )
    assert r.status_code == 200, r.text
    yield run, r.json()["id"]
    run.stop(abort=True)


@pytest.fixture(scope="module")
def echo(server, tmp_path_factory, smol):
    run = submit(
        server,
        tmp_path_factory,
        "sls-echo",
        HANDLER,
        workers="0..3",
        idle_timeout="3s",
        scaler={"type": "request_count", "value": 1},
    )
    yield run
    run.stop(abort=True)


@pytest.fixture(scope="module")
def gen(server, tmp_path_factory, echo):
    run = submit(server, tmp_path_factory, "sls-gen", GEN_HANDLER, workers="0..1", idle_timeout="10m")
    yield run
    run.stop(abort=True)


def test_endpoint_url_and_ps_at_zero(server, echo):
    assert echo.endpoint_url == f"{server.url}/v2/sls-echo"
    assert echo.endpoint_id == "sls-echo"
    h = health(server, echo)
    assert live_workers(h) == 0 and h["jobs"]["inQueue"] == 0
    assert f"{server.url}/v2/sls-echo" in ps(server)


def test_sdk_run_sync_cold_start_from_zero(server, echo, sdk):
    t0 = time.time()
    out = sdk.Endpoint("sls-echo").run_sync({"value": "first"}, timeout=COLD)
    cold = time.time() - t0
    print(f"\nfirst cold start (incl. pip install): {cold:.1f} s")
    assert out["echo"] == "first" and out["worker"].startswith("sls-echo-")
    assert out["event_loops"] is True  # the agent started it with dstack's worker hook (agent.workersite)
    assert live_workers(health(server, echo)) >= 1


def test_sdk_run_status_output(sdk, echo):
    job = sdk.Endpoint("sls-echo").run({"value": 42})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert job.output(timeout=60)["echo"] == 42
    assert job.status() == "COMPLETED"


def test_sdk_health_and_cancel(sdk, echo):
    ep = sdk.Endpoint("sls-echo")
    job = ep.run({"mode": "sleep", "seconds": 60, "value": "long"})
    wait_until(lambda: job.status() == "IN_PROGRESS", 90, what="the job to start")
    h = ep.health()
    assert h["jobs"]["inProgress"] == 1 and h["workers"]["running"] >= 1
    assert job.cancel()["status"] == "CANCELLED"
    assert job.status() == "CANCELLED"
    # the worker dropped the cancelled job and takes the next one
    assert ep.run_sync({"value": "after-cancel"}, timeout=60)["echo"] == "after-cancel"


def test_http_run_status_runsync_failure(server, echo):
    url, hdr = echo.endpoint_url, server.headers
    r = httpx.post(f"{url}/run", headers=hdr, json={"input": {"value": "curl"}})
    assert r.status_code == 200 and r.json()["status"] == "IN_QUEUE"
    job_id = r.json()["id"]
    st = wait_until(
        lambda: (s := httpx.get(f"{url}/status/{job_id}", headers=hdr).json())["status"] == "COMPLETED" and s,
        60,
        what="the job to complete",
    )
    assert st["id"] == job_id and st["output"]["echo"] == "curl"
    assert st["delayTime"] >= 0 and st["executionTime"] >= 0 and st["workerId"].startswith("sls-echo-")
    r = httpx.post(f"{url}/runsync", headers=hdr, json={"input": {"value": [1, 2]}}, timeout=100)
    assert r.status_code == 200 and r.json()["status"] == "COMPLETED" and r.json()["output"]["echo"] == [1, 2]
    r = httpx.post(f"{url}/runsync", headers=hdr, json={"input": {"mode": "fail"}}, timeout=100)
    assert r.json()["status"] == "FAILED" and "asked to fail" in r.json()["error"]
    assert httpx.get(f"{url}/status/no-such-job", headers=hdr).status_code == 404


def test_http_auth_and_cors(server, echo):
    url = echo.endpoint_url
    assert httpx.post(f"{url}/run", json={"input": {}}).status_code == 401
    assert httpx.post(f"{url}/run", json={"input": {}}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{url}/health").status_code == 401
    r = httpx.options(
        f"{url}/runsync",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert r.status_code in (200, 204)
    assert r.headers["access-control-allow-origin"] in ("https://app.example.com", "*")
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = httpx.get(f"{url}/health", headers={**server.headers, "Origin": "https://app.example.com"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("https://app.example.com", "*")


def test_sdk_stream_generator_handler(server, gen, sdk):
    job = sdk.Endpoint("sls-gen").run({"n": 4, "delay": 0.2})
    t0 = time.time()
    chunks = list(job.stream())  # polls /stream until the job ends; the first call pays a cold start
    assert chunks == [f"token-{i}" for i in range(4)], chunks
    print(f"\ncold start of a second endpoint (prepared venv): {time.time() - t0:.1f} s")
    assert job.status() == "COMPLETED"


def test_purge_queue(server, gen, sdk):
    # low-priority jobs never trigger scaling: with the worker busy they stay queued
    ep = sdk.Endpoint("sls-gen")
    busy = ep.run({"n": 1, "delay": 5})
    wait_until(lambda: busy.status() == "IN_PROGRESS", 60, what="the busy job to start")
    for _ in range(2):
        ep.rp_client.post("sls-gen/run", {"input": {"n": 1}, "policy": {"lowPriority": True}})
    assert ep.purge_queue() == {"removed": 2, "status": "completed"}
    assert ep.health()["jobs"]["inQueue"] == 0


def test_scale_out_under_burst_then_back_to_zero(server, echo, sdk):
    url, hdr = echo.endpoint_url, server.headers
    ids = [
        httpx.post(f"{url}/run", headers=hdr, json={"input": {"mode": "sleep", "seconds": 8, "value": i}}).json()["id"]
        for i in range(4)
    ]
    # request_count 1: one worker per queued or running job, capped at 3
    wait_until(lambda: live_workers(health(server, echo)) >= 2, 30, what="a second worker")
    table = ps(server)
    assert "sls-echo" in table and "workers:" in table
    t0 = time.time()
    seen_workers = set()

    states: list[dict] = []

    def settled():
        states[:] = [httpx.get(f"{url}/status/{i}", headers=hdr).json() for i in ids]
        seen_workers.update(s.get("workerId") for s in states if s.get("workerId"))
        return all(s["status"] not in ("IN_QUEUE", "IN_PROGRESS") for s in states)

    def worker_logs() -> str:
        return "\n".join(
            f"--- replica {n}:\n" + b"".join(echo.logs(replica_num=n, follow=False)).decode(errors="replace")[-3000:]
            for n in range(8)
        )

    try:
        wait_until(settled, 120, what="the burst to finish", interval=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}; jobs: {states}; health: {health(server, echo)}\n{worker_logs()}") from None
    if not all(s["status"] == "COMPLETED" for s in states):
        raise AssertionError(f"{[(s['status'], s.get('error'), s.get('workerId')) for s in states]}\n{worker_logs()}")
    print(f"\nburst of 4 x 8 s jobs finished {time.time() - t0:.1f} s after scale-out on {len(seen_workers)} workers")
    assert len(seen_workers) >= 2
    # idle for 3 s -> stopped; the worker jobs end and the endpoint is back at zero
    wait_until(lambda: sum(health(server, echo)["workers"].values()) == 0, 60, what="scale to zero", interval=0.5)
    assert "workers: none" in ps(server)


def test_openai_route_with_smollm2_worker(server, smol, sdk):
    run, warmup = smol
    t0 = time.time()
    st = wait_until(
        lambda: (
            (s := httpx.get(f"{run.endpoint_url}/status/{warmup}", headers=server.headers).json())["status"]
            in ("COMPLETED", "FAILED")
            and s
        ),
        COLD,
        what="the SmolLM2 worker's first job",
        interval=0.5,
    )
    assert st["status"] == "COMPLETED", st
    print(
        f"\nSmolLM2 warm-up job: waited {time.time() - t0:.1f} s more here; delay {st['delayTime'] / 1000:.1f} s, "
        f"execution {st['executionTime'] / 1000:.1f} s"
    )
    t0 = time.time()
    assert st["output"][0]["generated_text"] is not None
    client = openai.OpenAI(base_url=f"{run.endpoint_url}/openai/v1", api_key=server.token, timeout=120)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    resp = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=12, temperature=0)
    text = resp.choices[0].message.content
    assert text.strip() and resp.usage.completion_tokens <= 12
    print(f"first chat completion: {time.time() - t0:.1f} s")
    chunks = list(
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=12, temperature=0, stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same answer either way
    r = httpx.post(
        f"{run.endpoint_url}/runsync",
        headers=server.headers,
        timeout=100,
        json={"input": {"prompt": "The capital of France is", "parameters": {"max_new_tokens": 4}}},
    )
    assert r.json()["status"] == "COMPLETED" and r.json()["output"][0]["generated_text"]
    job = sdk.Endpoint("sls-smol").run(
        {"prompt": "Once upon a time", "parameters": {"max_new_tokens": 6}, "stream": True}
    )
    pieces = list(job.stream())
    assert pieces and all(isinstance(p, str) for p in pieces) and "".join(pieces).strip()


def test_stopped_run_removes_endpoint_and_ends_workers(server, gen, sdk):
    assert live_workers(health(server, gen)) == 1  # idle_timeout 10 m: still warm from the tests above
    gen.stop()
    wait_until(
        lambda: httpx.get(f"{gen.endpoint_url}/health", headers=server.headers).status_code == 404,
        30,
        what="the endpoint to go away",
    )
    assert httpx.post(f"{gen.endpoint_url}/run", headers=server.headers, json={"input": {}}).status_code == 404
    run = gen.wait(timeout=60)
    assert run.status.is_finished()
    assert run.jobs and all(j.job_submissions[-1].status.is_finished() for j in run.jobs)


def test_worker_waits_for_a_busy_host(server, tmp_path_factory, smol):
    # Last: frees the host first (the SmolLM2 worker holds a core). A task then holds every core,
    # so the endpoint's first worker cannot be placed: it waits (the job stays queued) and starts
    # as soon as the task ends.
    smol[0].stop(abort=True)
    smol[0].wait(timeout=60)
    client = server.client()
    repo = tmp_path_factory.mktemp("busy")
    (repo / "handler.py").write_text(HANDLER)
    hog = client.runs.submit(
        Task(commands=["sleep 300"], resources=Resources(cpu=os.cpu_count(), memory="0.1GB")),
        run_name="sls-cpu-hog",
        repo_dir=repo,
    )
    run = None
    try:
        hog.wait(statuses=(RunStatus.RUNNING,), timeout=60)
        conf = Serverless(
            setup=SETUP, commands=["python handler.py"], workers="0..1", resources=Resources(cpu=1, memory="0.3GB")
        )
        run = client.runs.submit(conf, run_name="sls-busy", repo_dir=repo)
        job_id = httpx.post(
            f"{run.endpoint_url}/run", headers=server.headers, json={"input": {"value": "waited"}}
        ).json()["id"]
        time.sleep(3)  # still queued 3 s later: that it waits is what is checked
        assert httpx.get(f"{run.endpoint_url}/status/{job_id}", headers=server.headers).json()["status"] == "IN_QUEUE"
        assert [j.job_submissions[-1].status.value for j in run.refresh().jobs] == ["submitted"]
        hog.stop(abort=True)
        st = wait_until(
            lambda: (
                (s := httpx.get(f"{run.endpoint_url}/status/{job_id}", headers=server.headers).json())["status"]
                == "COMPLETED"
                and s
            ),
            90,
            what="the job to run once the host is free",
            interval=0.5,
        )
        assert st["output"]["echo"] == "waited"
    finally:
        hog.stop(abort=True)
        if run is not None:
            run.stop(abort=True)
