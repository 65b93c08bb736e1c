"""Text generation end to end: CompletionService / CompletionTask / YAML engine, with the real model."""

import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from text_generation import Client as TGIClient

from dstack.api import CompletionService, CompletionTask, Resources
from dstack.core.errors import ServerClientError
from tests.e2e.util import wait_ready
from tests.util import free_port, wait_until

# The data plane barely touches the database: these run on SQLite only (the core suite, the CLI
# and serverless queues also run on PostgreSQL).
pytestmark = pytest.mark.parametrize("server", ["sqlite"], indirect=True)


MODEL = "SmolLM2-135M-Instruct"
SMALL = Resources(cpu=1, memory="1GB")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "text-generation" / "smollm2.dstack.yml"


def wait_healthy(url: str, headers: dict, timeout: float = 180) -> None:
    wait_ready(url, headers, timeout=timeout, path="health")


@pytest.fixture(scope="module")
def smol(server):
    run = server.client().runs.submit(CompletionService(model_name=MODEL), run_name="smol", resources=SMALL)
    wait_healthy(run.service_url, server.headers)
    yield run.refresh()
    run.stop(abort=True)


def test_openai_sdk_sync_and_streaming_through_the_proxy(server, smol):
    base = smol._run.service.model.base_url
    sdk = openai.OpenAI(base_url=base, api_key=server.token)
    assert [m.id for m in sdk.models.list()] == [MODEL]
    resp = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=12, temperature=0
    )
    assert resp.choices[0].message.content.strip()
    assert resp.usage.completion_tokens <= 12 and resp.usage.prompt_tokens > 5
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is 2+2?"}],
            max_tokens=12,
            temperature=0,
            stream=True,
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == resp.choices[0].message.content  # greedy: the same answer either way
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_text_generation_client_generate_and_stream(server, smol):
    tgi = TGIClient(smol.service_url.rstrip("/"), headers=server.headers, timeout=60)
    out = tgi.generate("What is Deep Learning?", max_new_tokens=16)
    assert out.generated_text and out.details.generated_tokens <= 16
    tokens = [
        r.token.text for r in tgi.generate_stream("What is Deep Learning?", max_new_tokens=16) if not r.token.special
    ]
    assert "".join(tokens) == out.generated_text
    # The seed's curl, as httpx.
    r = httpx.post(
        smol.service_url + "generate",
        headers=server.headers,
        json={"inputs": "What is Deep Learning?", "parameters": {"max_new_tokens": 20}},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["generated_text"]


def test_completion_task_private_endpoint(server, tmp_path):
    from text_generation import Client

    port = free_port()
    run = server.client().runs.submit(CompletionTask(model_name=MODEL, local_port=port), resources=SMALL)
    try:
        assert run.attach(timeout=120)

        def generated() -> str | None:
            try:
                return Client(f"http://localhost:{port}", timeout=30).generate("Hello", max_new_tokens=5).generated_text
            except Exception:
                return None

        text = wait_until(generated, 120, 0.3, "a generation through the forwarded port")
        assert text
    finally:
        run.detach()
        run.stop(abort=True)


def test_yaml_engine_configuration_via_cli(server):
    out = subprocess.run(
        [sys.executable, "-m", "dstack.cli.main", "apply", "-f", str(EXAMPLE), "-y", "-d", "-n", "smol-yaml"],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    client = server.client()
    run = client.runs.get("smol-yaml")
    try:
        assert "Service is published at" in out.stdout and run.service_url in out.stdout
        wait_healthy(run.service_url, server.headers)
        r = httpx.post(
            run.service_url + "generate",
            headers=server.headers,
            json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}},
            timeout=60,
        )
        assert r.status_code == 200
    finally:
        run.stop(abort=True)


def test_gpu_only_quantization_is_refused_before_anything_starts(server):
    client = server.client()
    with pytest.raises(ServerClientError) as e:
        client.runs.submit(CompletionService(model_name=MODEL, quantize="gptq"), resources=SMALL)
    assert "gptq" in str(e.value) and "GGUF" in str(e.value)
