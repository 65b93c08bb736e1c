"""The TGI bridge in front of an OpenAI-compatible engine (a fake vLLM: no GPU needed)."""

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest
from text_generation import Client as TGIClient

from dstack.serving.tgi_bridge import completion_request, stream_events, tgi_finish_reason
from tests.conftest import SRC
from tests.util import free_port, wait_until

FAKE = Path(__file__).with_name("fake_openai_engine.py")


def test_tgi_parameters_become_a_completions_request() -> None:
    greedy = completion_request("m", {"inputs": "hi", "parameters": {"max_new_tokens": 5, "stop": ["\n"]}}, False)
    assert greedy == {
        "model": "m",
        "prompt": "hi",
        "stream": False,
        "max_tokens": 5,
        "temperature": 0.0,
        "stop": ["\n"],
    }
    sampled = completion_request(
        "m", {"inputs": "hi", "parameters": {"top_k": 5, "seed": 1, "repetition_penalty": 1.1}}, True
    )
    assert sampled["temperature"] == 1.0 and sampled["top_k"] == 5 and sampled["seed"] == 1
    assert sampled["max_tokens"] is None  # up to the context length, like TGI
    assert sampled["stream_options"] == {"include_usage": True} and sampled["repetition_penalty"] == 1.1
    assert tgi_finish_reason({"finish_reason": "length"}) == "length"
    assert tgi_finish_reason({"finish_reason": "stop", "stop_reason": "###"}) == "stop_sequence"
    assert tgi_finish_reason({"finish_reason": "stop", "stop_reason": None}) == "eos_token"


def test_stream_events_carry_the_last_token_with_the_details() -> None:
    lines = [
        'data: {"choices": [{"text": "a"}]}',
        "",
        'data: {"choices": [{"text": "b"}]}',
        'data: {"choices": [{"text": "", "finish_reason": "length"}]}',
        'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}',
        "data: [DONE]",
    ]

    async def collect() -> list[dict]:
        async def it():
            for line in lines:
                yield line

        return [json.loads(e[5:]) async for e in stream_events(it(), {"inputs": "x", "parameters": {}})]

    events = asyncio.run(collect())
    assert [e["token"]["text"] for e in events] == ["a", "b"]
    assert events[0]["generated_text"] is None and events[0]["details"] is None
    assert events[1]["generated_text"] == "ab"
    assert events[1]["details"] == {"finish_reason": "length", "generated_tokens": 2, "seed": None, "input_length": 3}


@pytest.fixture
def bridge():
    port = free_port()
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + str(Path(__file__).resolve().parents[2]))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dstack.serving.tgi_bridge",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model-id",
            "fake/model",
            "--",
            sys.executable,
            str(FAKE),
        ],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, "the bridge exited"
        try:
            return httpx.get(url + "/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 30, 0.1, "the bridge to be healthy")
    engine = psutil.Process(proc.pid).children()  # the fake engine, ended with its bridge
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for child in engine:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def test_text_generation_client_through_the_bridge(bridge) -> None:
    url, _ = bridge
    tgi = TGIClient(url, timeout=10)
    out = tgi.generate("one two", max_new_tokens=2)
    assert out.generated_text == "Hello world"
    assert out.details.finish_reason == "length" and out.details.generated_tokens == 2
    assert httpx.get(url + "/last").json()["temperature"] == 0.0  # greedy, as TGI's default
    events = list(tgi.generate_stream("one two"))
    assert "".join(e.token.text for e in events) == "Hello world!"
    assert events[-1].generated_text == "Hello world!" and events[-1].details.finish_reason == "eos_token"
    assert tgi.generate("x", stop_sequences=["!"]).details.finish_reason == "stop_sequence"
    info = httpx.get(url + "/info").json()
    assert info["model_id"] == "fake/model" and info["max_total_tokens"] == 2048
    bad = httpx.post(url + "/generate", json={"inputs": "bad"})
    assert bad.status_code == 422 and bad.json() == {"error": "bad prompt", "error_type": "validation"}
    # the engine's own API passes through
    assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "fake/model"
    r = httpx.post(url + "/v1/completions", json={"model": "fake/model", "prompt": "a", "max_tokens": 1})
    assert r.json()["choices"][0]["text"] == "Hello"


def test_bridge_exits_with_the_engine(bridge) -> None:
    url, proc = bridge
    try:
        httpx.post(url + "/die", timeout=5)
    except httpx.HTTPError:
        pass
    assert proc.wait(15) == 3


def test_stopping_the_bridge_stops_the_engine(bridge) -> None:
    _, proc = bridge
    engine = psutil.Process(proc.pid).children()[0]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    engine.wait(15)
